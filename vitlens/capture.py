"""Attention capture: post-softmax attention weights of chosen layers, handed to a callback layer by layer.

timm's attention runs ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, and then the weights never
exist as a tensor: hooks that expect them capture nothing. :func:`attention_capture` switches each chosen layer to
the explicit path for the duration of the ``with`` block and hooks the module that receives the softmax output
(``attn_drop``, an identity in eval mode). Each layer's ``[B, heads, N, N]`` tensor goes to ``on_layer`` as soon as
the layer has run, so callers reduce it and drop it: memory stays one layer's worth. Every flag and hook is
restored in ``finally``, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vitlens.errors import UsageError, VitlensError

if TYPE_CHECKING:
    import torch

    from vitlens.models.vit import ViT

OnLayer = Callable[[int, "torch.Tensor"], None]


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Normalise 0-based layer indices (negative counts from the end) and check their range."""
    if layers is None:
        return list(range(depth))
    out = []
    for layer in layers:
        idx = layer + depth if layer < 0 else layer
        if not 0 <= idx < depth:
            raise UsageError(f"layer {layer} is out of range: the model has {depth} layers (0..{depth - 1})")
        out.append(idx)
    return sorted(set(out))


@contextmanager
def attention_capture(vit: ViT, on_layer: OnLayer, *, layers: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Capture post-softmax attention ``[B, heads, N, N]`` of ``layers`` while the block is active.

    Args:
        vit: the loaded model.
        on_layer: called as ``on_layer(layer_index, attn)`` right after each chosen layer's softmax; ``attn`` is
            the live tensor (detach-free in ``torch.no_grad``), valid only during the call.
        layers: 0-based layer indices (negative from the end); all layers when None.

    Yields:
        The resolved layer indices.

    Raises:
        VitlensError: the model has no attention module vitlens can capture.
    """
    sites = {site.layer: site for site in vit.attention_sites()}
    chosen = resolve_layers(layers, vit.depth)
    missing = [i for i in chosen if i not in sites]
    if missing:
        raise VitlensError(f"layers {missing} have no capturable attention module")

    saved_flags = []
    handles = []
    try:
        for idx in chosen:
            site = sites[idx]
            saved_flags.append((site.flag_owner, site.flag_owner.fused_attn))
            site.flag_owner.fused_attn = False

            def hook(_module, _inputs, output, _idx=idx):
                on_layer(_idx, output)

            handles.append(site.softmax_output.register_forward_hook(hook))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()
        for owner, flag in reversed(saved_flags):
            owner.fused_attn = flag
