"""The hook manager: attention weights and block outputs of chosen layers handed to callbacks, and timm's
fused-attention switch, each scoped to a ``with`` block.

Attention capture hands the post-softmax attention weights of chosen layers to a callback layer by layer.

timm's attention runs ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, and then the weights never
exist as a tensor: hooks that expect them capture nothing. :func:`attention_capture` switches each chosen layer to
the explicit path for the duration of the ``with`` block and hooks the module that receives the softmax output
(``attn_drop``, an identity in eval mode). Each layer's ``[B, heads, N, N]`` tensor goes to ``on_layer`` as soon as
the layer has run, so callers reduce it and drop it: memory stays one layer's worth. Every flag and hook is
restored in ``finally``, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from vitlens.errors import ParameterError, VitlensError

if TYPE_CHECKING:
    import torch

    from vitlens.models.vit import ViT

OnLayer = Callable[[int, "torch.Tensor"], None]


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Normalise 0-based layer indices (negative counts from the end) and check their range.

    Raises:
        ParameterError: a layer out of range, named ``layers`` (the parameter of every caller that passes a list).
    """
    if layers is None:
        return list(range(depth))
    out = []
    for layer in layers:
        idx = layer + depth if layer < 0 else layer
        if not 0 <= idx < depth:
            raise ParameterError(
                "layers", f"layers: layer {layer} is out of range: the model has {depth} layers (0..{depth - 1})"
            )
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
        ParameterError: a layer out of range.
        VitlensError: the model has no attention module vitlens can capture.
    """
    sites = {site.layer: site for site in vit.attention_sites()}
    chosen = resolve_layers(layers, vit.depth)
    missing = [i for i in chosen if i not in sites]
    if missing:
        raise VitlensError(f"layers {missing} have no capturable attention module")

    handles = []
    with fused_attention(vit, False, layers=chosen):
        try:
            for idx in chosen:

                def hook(_module, _inputs, output, _idx=idx):
                    on_layer(_idx, output)

                handles.append(sites[idx].softmax_output.register_forward_hook(hook))
            yield chosen
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def fused_attention(vit: ViT, enabled: bool, *, layers: Sequence[int] | None = None) -> Iterator[None]:
    """timm's ``fused_attn`` flag of ``layers`` (all when None) set to ``enabled`` inside the block, restored after.

    With the flag off, timm computes attention explicitly (softmax weights exist as a tensor); with it on, through
    ``F.scaled_dot_product_attention``.
    """
    chosen = set(resolve_layers(layers, vit.depth))
    owners = [site.flag_owner for site in vit.attention_sites() if site.layer in chosen]
    saved = [owner.fused_attn for owner in owners]
    try:
        for owner in owners:
            owner.fused_attn = enabled
        yield
    finally:
        for owner, flag in zip(owners, saved, strict=True):
            owner.fused_attn = flag


@contextmanager
def block_outputs(vit: ViT, layers: Sequence[int], on_block: OnLayer) -> Iterator[None]:
    """Call ``on_block(layer, tokens [B, N, D])`` as each chosen block of ``vit`` finishes, inside the block only.

    The hooks are removed in ``finally``, also when the forward raises.
    """
    blocks = vit.blocks()
    handles = []
    try:
        for layer in layers:

            def hook(_module, _inputs, output, _layer=layer):
                on_block(_layer, output)

            handles.append(blocks[layer].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def graph_from(vit: ViT, layer: int) -> Iterator[None]:
    """Inside the block, one forward pass of ``vit`` records its autograd graph from block ``layer`` on only.

    The blocks before ``layer`` run without autograd; block ``layer``'s input becomes a leaf that requires a gradient
    (a forward pre-hook detaches it and switches autograd on), so gradients of anything computed afterwards reach
    back to that block and no further, and the earlier layers keep no activations for a backward pass. For
    ``explain --method last-layer``, which reads the last layer's attention gradient alone. One forward per
    ``with``: autograd stays on after the hooked block until the end. The hook is removed and the grad mode of the
    caller restored on exit, also when the forward raises.
    """
    import torch

    index = resolve_layers([layer], vit.depth)[0]
    previous = torch.is_grad_enabled()

    def start_graph(_module, args):
        torch.set_grad_enabled(True)
        return (args[0].detach().requires_grad_(True), *args[1:])  # [B, N, D]: the graph's leaf

    handle = vit.blocks()[index].register_forward_pre_hook(start_graph)
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        handle.remove()
        torch.set_grad_enabled(previous)


@contextmanager
def hooks(
    vit: ViT,
    *,
    attention: OnLayer | None = None,
    blocks: OnLayer | None = None,
    layers: Sequence[int] | None = None,
) -> Iterator[list[int]]:
    """Every capture at once: attention weights and / or block outputs of ``layers``, one forward pass.

    Args:
        vit: the loaded model.
        attention: ``attention(layer, attn [B, heads, N, N])`` after each chosen layer's softmax, or None.
        blocks: ``blocks(layer, tokens [B, N, D])`` after each chosen block, or None.
        layers: 0-based layer indices (negative from the end); all layers when None.

    Yields:
        The resolved layer indices.
    """
    chosen = resolve_layers(layers, vit.depth)
    with ExitStack() as stack:
        if attention is not None:
            stack.enter_context(attention_capture(vit, attention, layers=chosen))
        if blocks is not None:
            stack.enter_context(block_outputs(vit, chosen, blocks))
        yield chosen
