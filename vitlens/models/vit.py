"""The loaded ViT: a timm model plus the facts vitlens needs about it, read in one place.

This module (with :mod:`vitlens.models.infer`) is the only code in vitlens that reads timm attribute names. Every
analysis asks :class:`ViT` for its :class:`~vitlens.layout.TokenLayout`, its attention modules, its position
embedding or its patch projection, so that fused attention, register / distillation tokens, ``no_embed_class`` and
non-square grids are handled once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlens.errors import VitlensError
from vitlens.layout import PrefixKind, Preprocess, TokenLayout

if TYPE_CHECKING:
    import torch
    from torch import nn


def is_timm_vit(model: nn.Module) -> bool:
    """True for timm's ``VisionTransformer`` and its subclasses (DeiT distilled, DeiT-3, DINOv2-style, ...)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def token_layout(model: nn.Module) -> TokenLayout:
    """Read the token layout of a timm ViT.

    timm orders the prefix as class token, then the distillation token (DeiT distilled) or the register tokens.
    """
    if not is_timm_vit(model):
        raise VitlensError(f"{type(model).__name__} is not a timm VisionTransformer; vitlens analyses ViTs only")
    kinds: list[PrefixKind] = []
    if getattr(model, "cls_token", None) is not None:
        kinds.append("cls")
    if getattr(model, "dist_token", None) is not None:
        kinds.append("dist")
    kinds.extend(["reg"] * int(getattr(model, "num_reg_tokens", 0) or 0))
    if len(kinds) != model.num_prefix_tokens:
        raise VitlensError(
            f"{type(model).__name__} reports {model.num_prefix_tokens} prefix tokens but vitlens found "
            f"{len(kinds)} ({', '.join(kinds) or 'none'}); this ViT variant is not supported"
        )
    pe = model.patch_embed
    grid = tuple(int(g) for g in pe.grid_size)
    if hasattr(pe, "backbone"):  # hybrid: patch_size counts feature-map cells; the pixel footprint is img / grid
        patch = tuple(int(i) // g for i, g in zip(pe.img_size, grid, strict=True))
    else:
        patch = tuple(int(p) for p in pe.patch_size)
    return TokenLayout(
        grid_size=grid,
        patch_size=patch,
        prefix_kinds=tuple(kinds),
        pos_embed_includes_prefix=not bool(getattr(model, "no_embed_class", False)),
        has_pos_embed=getattr(model, "pos_embed", None) is not None,
    )


@dataclass(frozen=True)
class AttentionSite:
    """One layer's attention: the module whose ``fused_attn`` flag picks SDPA, and the module that receives the
    post-softmax weights ``[B, heads, N, N]`` on the explicit path (timm's ``attn_drop``, identity in eval mode)."""

    layer: int
    flag_owner: nn.Module
    softmax_output: nn.Module
    num_heads: int


@dataclass
class ViT:
    """A timm ViT in eval mode on its device, with its token layout, preprocessing and provenance.

    Build it with :func:`vitlens.load_vit`; construct it directly only around a timm model you already have.
    """

    model: nn.Module
    preprocess: Preprocess
    source: str = "<in-memory>"  # what the user asked for, resolved (path, timm name, 'demo')
    arch: str = ""  # timm architecture name, or 'vit_inferred' when read from the state dict
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs that rebuild it
    class_names: list[str] | None = None
    guessed: dict[str, str] = field(default_factory=dict)  # fact -> why it was guessed (e.g. num_heads)
    model_id: str = ""  # a stable id given at load time (timm name + tag); files are hashed on demand instead
    checkpoint_path: Path | None = None  # the file the weights came from, if any
    metadata: dict[str, Any] = field(default_factory=dict)  # vitlens checkpoint metadata, if any
    source_format: str = ""  # the checkpoint's family, e.g. 'hf-transformers:Dinov2WithRegistersModel', 'torchvision'
    converted: list[str] = field(default_factory=list)  # what the loader rewrote or read from the source's configs
    dropped: list[str] = field(default_factory=list)  # parts of the checkpoint the timm model does not keep
    layout: TokenLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = token_layout(self.model)
        self.model.eval()

    def refresh_layout(self) -> None:
        """Re-read the layout after the model's input size changed."""
        self.layout = token_layout(self.model)

    # ----------------------------------------------------------------------------------------- facts
    @functools.cached_property
    def identity(self) -> str:
        """Stable id for caches: ``model_id``, else the checkpoint's SHA-256 (read only when first asked for, since
        hashing a large checkpoint costs a second read of the file), else "" (a model built in memory)."""
        if self.model_id:
            return self.model_id
        if self.checkpoint_path is not None:
            from vitlens.models.checkpoint import file_sha256

            return "sha256:" + file_sha256(self.checkpoint_path)
        return ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_heads(self) -> int:
        heads = {site.num_heads for site in self.attention_sites()}
        if len(heads) != 1:
            raise VitlensError(f"layers have different head counts {sorted(heads)}; not supported")
        return heads.pop()

    @property
    def in_chans(self) -> int:
        return self.preprocess.in_chans

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def global_pool(self) -> str:
        return str(getattr(self.model, "global_pool", "token") or "")

    @property
    def has_linear_patch_embed(self) -> bool:
        """True when the patch embedding is one linear projection (a conv with kernel = stride = patch size)."""
        from torch import nn

        proj = getattr(self.model.patch_embed, "proj", None)
        return (
            isinstance(proj, nn.Conv2d)
            and tuple(proj.kernel_size) == self.layout.patch_size
            and tuple(proj.stride) == self.layout.patch_size
            and not hasattr(self.model.patch_embed, "backbone")
        )

    # ------------------------------------------------------------------------------------ weights
    def patch_projection(self) -> torch.Tensor:
        """The linear patch projection's weight ``[embed_dim, in_chans, ph, pw]`` (detached).

        Raises:
            VitlensError: the patch embedding is a CNN stem or hybrid backbone, not one linear projection.
        """
        if not self.has_linear_patch_embed:
            raise VitlensError(
                "this model's patch embedding is not one linear projection (hybrid CNN or conv stem): "
                "filter PCA needs a plain ViT patch embedding"
            )
        return self.model.patch_embed.proj.weight.detach()

    def position_embedding(self) -> torch.Tensor:
        """The learned absolute position embedding ``pos_embed[0]`` ``[N_pos, embed_dim]`` (detached).

        Its rows include the prefix tokens unless ``layout.pos_embed_includes_prefix`` is False.

        Raises:
            VitlensError: the model has no learned absolute position embedding (none, RoPE or relative bias only).
        """
        pos = getattr(self.model, "pos_embed", None)
        if pos is None or not self.layout.has_pos_embed:
            raise VitlensError(
                "this model has no learned absolute position embedding (pos_embed is absent or 'none'); "
                "position-similarity needs one"
            )
        return pos.detach()[0]

    def attention_sites(self) -> list[AttentionSite]:
        """Every block's self-attention, in depth order.

        Raises:
            VitlensError: no block exposes timm's explicit-attention path (``fused_attn`` + ``attn_drop``).
        """
        sites = []
        for i, block in enumerate(self.model.blocks):
            # Block / ResPostBlock keep attention in `.attn`; ParallelScalingBlock computes it in the block itself.
            owner = getattr(block, "attn", None)
            if owner is None or not hasattr(owner, "fused_attn"):
                owner = block
            if not hasattr(owner, "fused_attn") or not hasattr(owner, "attn_drop") or not hasattr(owner, "num_heads"):
                continue
            sites.append(AttentionSite(i, owner, owner.attn_drop, int(owner.num_heads)))
        if not sites:
            raise VitlensError(
                f"found no timm attention module with an explicit softmax path in {type(self.model).__name__}; "
                "attention capture is not supported for this architecture"
            )
        return sites

    # ------------------------------------------------------------------------------------ hooks
    def hooks(
        self,
        *,
        attention: Callable[[int, torch.Tensor], None] | None = None,
        blocks: Callable[[int, torch.Tensor], None] | None = None,
        layers: Sequence[int] | None = None,
    ) -> AbstractContextManager[list[int]]:
        """Scoped capture of attention weights ``[B, heads, N, N]`` and / or block outputs ``[B, N, D]`` of
        ``layers`` (all when None), handed to the callbacks as each layer runs (:func:`vitlens.capture.hooks`).

        Use as ``with vit.hooks(attention=on_attn, layers=[-1]): vit.model(x)``; hooks are removed and flags
        restored on exit, also when the forward raises.
        """
        from vitlens.capture import hooks

        return hooks(self, attention=attention, blocks=blocks, layers=layers)

    def fused_attention(self, enabled: bool) -> AbstractContextManager[None]:
        """timm's fused-attention (SDPA) switch of every layer set to ``enabled`` inside a ``with`` block."""
        from vitlens.capture import fused_attention

        return fused_attention(self, enabled)

    def reset_head(self, num_classes: int, *, zero: bool = True) -> None:
        """A new classifier of ``num_classes`` outputs (timm's ``reset_classifier``), zero-initialised by default as
        in the ViT paper's fine-tuning (§3.2); a distillation head too, where the model has one."""
        import torch

        self.model.reset_classifier(num_classes)
        # The checkpoint's own multi-layer head is gone: its description must not be saved with the new one, and
        # the kwargs that rebuild the model now give the new head's size.
        for key in ("head_layers", "head_act"):
            self.arch_kwargs.pop(key, None)
        self.arch_kwargs["num_classes"] = num_classes
        if zero:
            with torch.no_grad():
                for name in ("head", "head_dist"):
                    head = getattr(self.model, name, None)
                    if isinstance(head, torch.nn.Linear):
                        head.weight.zero_()
                        head.bias.zero_()

    # ------------------------------------------------------------------------------------ forward
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Token sequence after the final norm ``[B, N, embed_dim]``."""
        return self.model.forward_features(images)

    def pre_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the classifier head sees ``[B, embed_dim]``: the pooled (class token or mean) representation."""
        return self.model.forward_head(tokens, pre_logits=True)

    def forward_kept(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of the model shown only the patch tokens ``keep`` ``[B, K]`` (grid indices,
        row-major, any ``0 <= K <= H*W``); the prefix tokens always stay.

        timm's ``forward`` step by step, as ``PatchDropout`` does it in training: the patches are embedded and given
        their position embedding by timm's own ``_pos_embed`` (class / register / distillation tokens,
        ``no_embed_class``, a dynamic image size), and only then are the kept patch tokens gathered, so each keeps its
        own position; ``norm_pre``, the blocks, the final norm and ``forward_head`` (pool, ``fc_norm``, head) follow.
        ``pos_drop`` and ``patch_drop`` are the identity in eval mode. With every patch kept in grid order this is
        ``model(images)``. Pooling over patch tokens (``avg``) averages the kept ones; with ``K = 0`` it has nothing
        to average and gives NaN.

        Raises:
            VitlensError: ``keep`` is not ``[B, K]`` or holds an index outside the grid.
        """
        import torch

        m, layout = self.model, self.layout
        if keep.ndim != 2 or keep.shape[0] != images.shape[0]:
            raise VitlensError(
                f"keep must be [B, K] patch indices for {images.shape[0]} images, not {list(keep.shape)}"
            )
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= layout.num_patches):
            raise VitlensError(f"keep holds patch indices outside 0..{layout.num_patches - 1}")
        tokens = m._pos_embed(m.patch_embed(images))  # [B, P + H*W, D], position embedded
        prefix = tokens[:, : layout.num_prefix_tokens]  # [B, P, D]
        patches = tokens[:, layout.patch_slice]  # [B, H*W, D]
        index = keep.to(device=tokens.device, dtype=torch.int64)[..., None].expand(-1, -1, tokens.shape[-1])
        x = torch.cat([prefix, patches.gather(1, index)], dim=1)  # [B, P + K, D]
        x = m.norm(m.blocks(m.norm_pre(x)))
        return m.forward_head(x)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def describe(self) -> dict[str, Any]:
        """The facts `vitlens info` prints, JSON-ready."""
        from vitlens.models.convert import describe_head

        layout = self.layout
        pos_kind = "none"
        if layout.has_pos_embed:
            pos_kind = "learned, patches only (no_embed_class)" if not layout.pos_embed_includes_prefix else "learned"
        return {
            "source": self.source,
            "source_format": self.source_format,
            "arch": self.arch,
            "model_class": type(self.model).__name__,
            "num_params": self.num_params,
            "img_size": list(layout.img_size),
            "patch_size": list(layout.patch_size),
            "grid_size": list(layout.grid_size),
            "num_patches": layout.num_patches,
            "num_prefix_tokens": layout.num_prefix_tokens,
            "prefix_tokens": list(layout.prefix_kinds),
            "has_class_token": layout.has_class_token,
            "has_dist_token": layout.has_dist_token,
            "num_reg_tokens": layout.num_reg_tokens,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "head": describe_head(self.model),  # e.g. "linear 384→10", "mlp: linear 768→768, tanh, linear 768→1000"
            "global_pool": self.global_pool,
            "pos_embed": pos_kind,
            "linear_patch_embed": self.has_linear_patch_embed,
            "mean": list(self.preprocess.mean),
            "std": list(self.preprocess.std),
            "interpolation": self.preprocess.interpolation,
            "crop_pct": self.preprocess.crop_pct,
            "crop_mode": self.preprocess.crop_mode,
            "class_names": self.class_names,
            "device": str(self.device),
            "converted": list(self.converted),
            "dropped": list(self.dropped),
            "guessed": dict(self.guessed),
        }
