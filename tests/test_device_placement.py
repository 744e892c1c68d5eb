"""Every tensor an analysis makes is born on its inputs' device, which is what running on CUDA or MPS rests on.

No accelerator is needed: the analyses run on CPU inputs inside ``torch.device("meta")``, which sends every tensor
created without an explicit ``device=`` to the meta device. On a GPU such a tensor would land on the CPU beside
CUDA inputs; here it meets the CPU inputs as a meta tensor, and the mixed operation raises. Images are decoded on
the host by design (the data layer moves each batch to the model's device), so the loader runs outside the mode.
The CUDA/MPS tests beside the analyses (``test_accelerator_matches_cpu``, ``test_cuda_matches_cpu``) check the
numbers where a device exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from tests.conftest import make_vit
from vitlens import attention, data
from vitlens import features as fewshot_module
from vitlens.analysis import (
    attention_rollout,
    cls_attention_per_head,
    filter_pca,
    mean_attention_distance,
    position_similarity,
)
from vitlens.analysis.fewshot import fewshot_lsr
from vitlens.attention import head_attention_for, mean_attention_distance_for, rollout_for
from vitlens.features import extract_features
from vitlens.layout import Preprocess, TokenLayout
from vitlens.models.vit import ViT

LAYOUT = TokenLayout(grid_size=(3, 5), patch_size=(16, 8), prefix_kinds=("cls", "reg"))


def _on_inputs_device(run: Callable[[], object]) -> object:
    with torch.device("meta"):
        return run()


def test_the_check_catches_a_tensor_born_on_the_default_device():
    attn = torch.rand(2, 3, 4, 4)
    with pytest.raises((RuntimeError, NotImplementedError)):
        _on_inputs_device(lambda: attn * torch.ones(4))  # torch.ones(4) without device=: the bug this file hunts
    assert _on_inputs_device(lambda: attn * torch.ones(4, device=attn.device)).device == attn.device


def _attention(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = LAYOUT.num_tokens
    return torch.randn(2, 4, n, n, generator=g).softmax(-1)  # [B, heads, N, N]


def test_pure_analyses_create_nothing_off_device():
    layers = [_attention(seed) for seed in range(3)]
    g = torch.Generator().manual_seed(0)
    pos_embed = torch.randn(LAYOUT.num_tokens, 16, generator=g)
    weight = torch.randn(32, 3, 16, 8, generator=g)
    results = {
        "distance": _on_inputs_device(lambda: mean_attention_distance(layers, LAYOUT).distance_px),
        "rollout": _on_inputs_device(lambda: attention_rollout(layers, LAYOUT, discard_ratio=0.5).maps),
        "per-head": _on_inputs_device(lambda: cls_attention_per_head(layers[0], LAYOUT)),
        "pos-sim": _on_inputs_device(lambda: position_similarity(pos_embed, LAYOUT).similarity),
        "filters": _on_inputs_device(lambda: filter_pca(weight, num_components=8).explained_variance_ratio),
    }
    # The same calls outside the mode give the same numbers: the mode changed where tensors live, nothing else.
    np.testing.assert_allclose(results["distance"], mean_attention_distance(layers, LAYOUT).distance_px)
    np.testing.assert_allclose(results["pos-sim"], position_similarity(pos_embed, LAYOUT).similarity)
    assert all(isinstance(r, np.ndarray) and np.isfinite(r).all() for r in results.values())


@pytest.mark.parametrize("l2", [1024.0, "auto"])
@pytest.mark.parametrize("labels_as", [np.asarray, torch.as_tensor])
def test_fewshot_solve_creates_nothing_off_device(l2, labels_as):
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 10, generator=g), torch.randn(30, 10, generator=g)  # [N, D], [M, D]
    y_train, y_test = labels_as(np.repeat(np.arange(3), 20)), labels_as(np.repeat(np.arange(3), 10))
    out = _on_inputs_device(lambda: fewshot_lsr(train, y_train, test, y_test, shots=[1, 5], seeds=2, l2=l2))
    plain = fewshot_lsr(train, y_train, test, y_test, shots=[1, 5], seeds=2, l2=l2)
    np.testing.assert_array_equal(out.accuracy, plain.accuracy)


def _host_loader(real: Callable[..., Iterator[data.Batch]]) -> Callable[..., Iterator[data.Batch]]:
    """``iterate_batches`` with the loader itself outside the meta mode: images are decoded on the host."""

    def batches(*args, **kwargs) -> Iterator[data.Batch]:
        with torch.device("cpu"):
            it = real(*args, **kwargs)
        while True:
            with torch.device("cpu"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    return batches


@pytest.mark.parametrize("name", ["reg", "distilled", "gap", "nonsquare", "reg_no_embed_class"])
def test_model_driven_analyses_create_nothing_off_device(name, monkeypatch):
    model = make_vit(name)
    vit = ViT(model, Preprocess(img_size=tuple(model.patch_embed.img_size)))
    dataset = data.open_dataset("digits", vit.preprocess, num_images=6)
    for module in (attention, fewshot_module):
        monkeypatch.setattr(module, "iterate_batches", _host_loader(data.iterate_batches))
    distance = _on_inputs_device(lambda: mean_attention_distance_for(vit, dataset, batch_size=4))
    rollout = _on_inputs_device(lambda: rollout_for(vit, dataset, batch_size=4, discard_ratio=0.3))
    heads = _on_inputs_device(lambda: head_attention_for(vit, dataset, layer=-1, batch_size=4))
    kind = "cls" if vit.layout.has_class_token else "mean-patch"
    feats = _on_inputs_device(lambda: extract_features(vit, dataset, layers=[0, -1], feature=kind, batch_size=4))
    pre_logits = _on_inputs_device(lambda: extract_features(vit, dataset, batch_size=4))
    assert distance.num_images == 6 and rollout.maps.shape == (6, *vit.layout.grid_size)
    assert heads.shape == (6, vit.num_heads, *vit.layout.grid_size)
    assert all(f.device.type == "cpu" and f.shape[0] == 6 for f in (*feats.values(), *pre_logits.values()))
    np.testing.assert_allclose(distance.distance_px, mean_attention_distance_for(vit, dataset).distance_px, rtol=1e-6)
