"""Device choice: ``auto`` picks CUDA, then MPS, then CPU; explicit choices are checked before any work starts."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vitlens.errors import UsageError, VitlensError

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device`` that exists on this machine.

    Raises:
        UsageError: the spelling is not one of the above.
        VitlensError: the device was asked for but this machine does not have it.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if not _DEVICE_RE.match(spec):
        raise UsageError(f"unknown device '{spec}': use auto, cpu, cuda, cuda:N or mps")
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
    if spec == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise VitlensError("device 'mps' was requested but MPS is not available on this machine")
    return torch.device(spec)
