"""Helpers shared by the analysis modules: float64 placement, input checks, numpy/JSON conversion."""

from __future__ import annotations

import math

import numpy as np
import torch

from vitlens.errors import VitlensError
from vitlens.layout import TokenLayout


def f64_device(device: torch.device) -> torch.device:
    """Where float64 work on tensors from ``device`` happens: ``device`` itself, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def as_f64(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``t`` detached in float64 on ``device`` (default: its own, or the CPU for MPS); moved first, then cast."""
    target = f64_device(t.device) if device is None else device
    return t.detach().to(target).to(torch.float64)


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Float dtype for the heavy per-batch work: at least float32 (half/bf16 are upcast), float64 kept, never on MPS."""
    out = torch.promote_types(dtype, torch.float32)
    return torch.float32 if device.type == "mps" else out


def check_attention(attn: torch.Tensor, layout: TokenLayout) -> None:
    """Raise a one-line error unless ``attn`` is one layer's attention ``[B, heads, N, N]`` for ``layout``."""
    n = layout.num_tokens
    if attn.ndim != 4 or attn.shape[-1] != n or attn.shape[-2] != n:
        raise VitlensError(
            f"expected attention of shape [B, heads, {n}, {n}] for a {layout.grid_size[0]}x{layout.grid_size[1]} grid "
            f"with {layout.num_prefix_tokens} prefix tokens, got {list(attn.shape)}"
        )
    if not attn.is_floating_point():
        raise VitlensError(f"attention must be a floating-point tensor, got {attn.dtype}")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached CPU float64 numpy copy of ``t`` (moved first, cast on the CPU: MPS has no float64)."""
    return t.detach().to("cpu").to(torch.float64).numpy().copy()


def json_float(x: float) -> float | None:
    """``x`` as a JSON-safe float: NaN and infinities become ``None``."""
    x = float(x)
    return x if math.isfinite(x) else None
