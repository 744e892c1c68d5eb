"""Principal components of the patch-embedding filters: Fig. 7 (left) of the ViT paper (Dosovitskiy et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from vitlens.analysis._common import as_f64, to_numpy

# ViT paper, Fig. 7 (left): "RGB embedding filters (first 28 principal components)".
from vitlens.defaults import FILTERS_NUM_COMPONENTS as PAPER_NUM_COMPONENTS  # the paper's Fig. 7 shows 28
from vitlens.errors import ParameterError, VitlensError


@dataclass(frozen=True)
class FilterPCA:
    """PCA of the ``D`` patch-embedding filters, each a ``C x ph x pw`` image."""

    components: np.ndarray  # [K, C, ph, pw] orthonormal principal directions, largest-|value| entry made positive
    explained_variance_ratio: np.ndarray  # [K] s_k^2 / sum of all s^2
    singular_values: np.ndarray  # [min(D, C*ph*pw)] every singular value of the centred filter matrix, descending
    mean_filter: np.ndarray  # [C, ph, pw] the mean filter subtracted before the SVD

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    def to_dict(self) -> dict:
        return {
            "num_components": self.num_components,
            "components": self.components.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "singular_values": self.singular_values.tolist(),
            "mean_filter": self.mean_filter.tolist(),
        }


def filter_pca(weight: torch.Tensor, *, num_components: int | None = None) -> FilterPCA:
    """Principal components of a patch projection's filters.

    The ``D`` filters are the rows of the ``D x (C*ph*pw)`` flattened weight; they are centred on their mean and the
    SVD of that matrix gives the principal directions (right singular vectors) and the variance each explains.

    Args:
        weight: the patch projection's conv weight ``[D, C, ph, pw]`` (timm's ``patch_embed.proj.weight``).
        num_components: how many components to keep. ``None`` means the paper's 28, or all there are if fewer.

    Raises:
        ParameterError: ``num_components`` is below 1 or above ``min(D, C*ph*pw)``.
        VitlensError: ``weight`` is not 4-D.
    """
    if weight.ndim != 4:
        raise VitlensError(f"expected a patch projection weight [D, C, ph, pw], got shape {list(weight.shape)}")
    d, c, ph, pw = weight.shape
    available = min(d, c * ph * pw)
    if num_components is None:
        k = min(PAPER_NUM_COMPONENTS, available)
    elif not 1 <= num_components <= available:
        raise ParameterError(
            "num_components",
            f"num_components must be between 1 and {available} (min of {d} filters and {c}*{ph}*{pw} values), "
            f"got {num_components}",
        )
    else:
        k = num_components

    # SVD in float64 on the weight's device; MPS has no float64, so there the weights go to the CPU (a few hundred KB).
    w = as_f64(weight)
    flat = rearrange(w, "d c ph pw -> d (c ph pw)")  # [D, C*ph*pw]
    mean = flat.mean(dim=0)  # [C*ph*pw]
    centred = flat - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # s [min(D, F)], vh [min(D, F), F]
    comps = vh[:k]  # [K, F]

    # Singular vectors are defined up to sign; make each one's largest-magnitude entry positive so that repeated
    # runs (and different LAPACK backends) give the same pictures.
    pivot = comps.abs().argmax(dim=1, keepdim=True)  # [K, 1]
    signs = torch.sign(comps.gather(1, pivot))  # [K, 1], never 0: the pivot has the largest |value| of a unit vector
    comps = comps * signs

    total = (s**2).sum()
    # Identical filters leave only float64 round-off after centring (~1e-32 of their energy); a ratio of that
    # would call noise "100% explained", so variance below 1e-20 of the filters' energy counts as none.
    has_variance = total > 1e-20 * (flat**2).sum()
    ratio = s[:k] ** 2 / total if has_variance else torch.zeros_like(s[:k])
    return FilterPCA(
        components=to_numpy(rearrange(comps, "k (c ph pw) -> k c ph pw", c=c, ph=ph, pw=pw)),
        explained_variance_ratio=to_numpy(ratio),
        singular_values=to_numpy(s),
        mean_filter=to_numpy(rearrange(mean, "(c ph pw) -> c ph pw", c=c, ph=ph, pw=pw)),
    )
