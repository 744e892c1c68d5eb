"""Device choice: ``auto`` picks CUDA, then MPS, then CPU; explicit choices are checked before any work starts.

Also the default batch size per device: the analyses are forward passes, and their best batch size depends on the
device far more than on the model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vitlens.errors import UsageError, VitlensError

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device`` that exists on this machine.

    Under torchrun (more than one process), ``auto`` and ``cuda`` give each process ``cuda:LOCAL_RANK``, and an
    explicit ``cuda:N`` must be that device.

    Raises:
        UsageError: the spelling is not one of the above, or a ``cuda:N`` under torchrun that is not this
            process's own GPU.
        VitlensError: the device was asked for but this machine does not have it.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if not _DEVICE_RE.match(spec):
        raise UsageError(f"unknown device '{spec}': use auto, cpu, cuda, cuda:N or mps")
    if spec in ("auto", "cuda") and torch.cuda.is_available() and _torchrun_local_rank() is not None:
        # torchrun: each rank on its node's GPU LOCAL_RANK (wrapping round when there are more ranks than GPUs)
        return torch.device("cuda", _torchrun_local_rank() % torch.cuda.device_count())
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitlensError(f"device '{spec}' was requested but CUDA is not available on this machine")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise VitlensError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        local = _torchrun_local_rank()
        if local is not None and index != local % torch.cuda.device_count():
            # The same cuda:N on every rank would put them all on one GPU (and NCCL refuses that).
            raise UsageError(
                f"device '{spec}' under torchrun: each process uses its own GPU, cuda:LOCAL_RANK "
                f"(here cuda:{local % torch.cuda.device_count()}); pass --device cuda"
            )
    if spec == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise VitlensError("device 'mps' was requested but MPS is not available on this machine")
    return torch.device(spec)


def _torchrun_local_rank() -> int | None:
    """``LOCAL_RANK`` when torchrun started more than one process, else None (one process keeps plain ``cuda``)."""
    import os

    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return None
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None


CPU_BATCH_SIZE = 8
"""Default images per forward pass on the CPU. On the CPU the per-layer working set (activations, and for the
attention analyses the ``[B, heads, N, N]`` map) must stay near the cache to be fast (measured: see "Numbers
quoted in the code" in docs/benchmarks.md)."""

ACCELERATOR_BATCH_SIZE = 64
"""Default images per forward pass on CUDA and MPS, where larger batches keep the device busy; the attention
analyses still lower it to their memory budget (:func:`vitlens.attention.capped_batch_size`)."""


def default_batch_size(device: torch.device) -> int:
    """The batch size the analyses use on ``device`` when none is given (see :data:`CPU_BATCH_SIZE`)."""
    return CPU_BATCH_SIZE if device.type == "cpu" else ACCELERATOR_BATCH_SIZE


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """``batch_size``, or the device's default when None (range checks happen where batches are cut)."""
    return default_batch_size(device) if batch_size is None else batch_size
