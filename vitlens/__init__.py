"""vitlens: look inside trained Vision Transformers.

The public API, flat as timm's and scikit-learn's::

    import vitlens

    vit = vitlens.load("demo")  # a checkpoint file or folder, timm name, hf-hub:org/name
    data = vitlens.open_dataset("digits", vit, num_images=64)
    mad = vitlens.attention_distance(vit, data)  # a result object
    mad.plot()  # -> matplotlib Axes; mad.figure() -> Figure
    mad.save("out/")  # the files the CLI writes; vitlens.load_result("out/") reads them back

Names are resolved on first use, so ``import vitlens`` imports neither torch nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    # models and data
    "load": ("vitlens.models.load", "load_vit"),
    "load_vit": ("vitlens.models.load", "load_vit"),
    "ViT": ("vitlens.models.vit", "ViT"),
    "open_dataset": ("vitlens.data", "open_dataset"),
    "ImageDataset": ("vitlens.data", "ImageDataset"),
    "TokenLayout": ("vitlens.layout", "TokenLayout"),
    "Preprocess": ("vitlens.layout", "Preprocess"),
    "attention_capture": ("vitlens.capture", "attention_capture"),
    # analyses: one function and one result type each
    "filters": ("vitlens.definitions.filters", "filters"),
    "FiltersResult": ("vitlens.definitions.filters", "FiltersResult"),
    "pos_sim": ("vitlens.definitions.pos_sim", "pos_sim"),
    "PosSimResult": ("vitlens.definitions.pos_sim", "PosSimResult"),
    "attention_distance": ("vitlens.definitions.attention_distance", "attention_distance"),
    "AttentionDistanceResult": ("vitlens.definitions.attention_distance", "AttentionDistanceResult"),
    "rollout": ("vitlens.definitions.rollout", "rollout"),
    "RolloutResult": ("vitlens.definitions.rollout", "RolloutResult"),
    "fewshot": ("vitlens.definitions.fewshot", "fewshot"),
    "FewShotProbeResult": ("vitlens.definitions.fewshot", "FewShotProbeResult"),
    "explain_faithfulness": ("vitlens.definitions.explain", "explain_faithfulness"),
    "FaithfulnessResult": ("vitlens.definitions.explain", "FaithfulnessResult"),
    # results, registry, errors
    "Result": ("vitlens.result", "Result"),
    "load_result": ("vitlens.result", "load_result"),
    "analyses": ("vitlens.registry", "definitions"),
    "VitlensError": ("vitlens.errors", "VitlensError"),
    "ParameterError": ("vitlens.errors", "ParameterError"),
}

__all__ = [
    "AttentionDistanceResult",
    "FewShotProbeResult",
    "FiltersResult",
    "ImageDataset",
    "ParameterError",
    "PosSimResult",
    "Preprocess",
    "Result",
    "RolloutResult",
    "TokenLayout",
    "ViT",
    "VitlensError",
    "__version__",
    "analyses",
    "attention_capture",
    "attention_distance",
    "fewshot",
    "filters",
    "load",
    "load_result",
    "load_vit",
    "open_dataset",
    "pos_sim",
    "rollout",
]


def _analysis_names() -> dict[str, Any]:
    """Every registered analysis's public function and result type, by name (the registry is torch-free)."""
    from vitlens.registry import definitions

    names: dict[str, Any] = {}
    for definition in definitions():
        names[definition.compute.__name__] = definition.compute
        names[definition.result.__name__] = definition.result
    return names


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
    else:  # an analysis registered without an entry above: found through the registry
        value = _analysis_names().get(name)
        if value is None:
            raise AttributeError(f"module 'vitlens' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


__all__ += [name for name in _analysis_names() if name not in __all__]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from vitlens.capture import attention_capture
    from vitlens.data import ImageDataset, open_dataset
    from vitlens.definitions.attention_distance import AttentionDistanceResult, attention_distance
    from vitlens.definitions.fewshot import FewShotProbeResult, fewshot
    from vitlens.definitions.filters import FiltersResult, filters
    from vitlens.definitions.pos_sim import PosSimResult, pos_sim
    from vitlens.definitions.rollout import RolloutResult, rollout
    from vitlens.errors import ParameterError, VitlensError
    from vitlens.layout import Preprocess, TokenLayout
    from vitlens.models.load import load_vit
    from vitlens.models.load import load_vit as load
    from vitlens.models.vit import ViT
    from vitlens.registry import definitions as analyses
    from vitlens.result import Result, load_result
