"""What decides a training run: :class:`TrainConfig`, the measured presets, and the checks on both."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vitlens.errors import UsageError

Augment = Literal["none", "basic", "strong"]
# Datasets whose images must not be mirrored (digits and text read differently when flipped).
NO_FLIP_DATA = ("digits", "mnist", "svhn")
GREY_DATA = ("digits", "mnist", "fashion-mnist")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in checkpoints and resume files."""

    data: str = "digits"  # --data spec (must have labels)
    arch: str = "vit_tiny_patch16_224"  # timm ViT architecture for training from scratch
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm kwargs (img_size, depth, ...); with init_from,
    # the loader's options for the source model (num_heads, extra timm kwargs)
    init_from: str | None = None  # fine-tune this model (anything load_vit accepts) instead of training from scratch
    img_size: tuple[int, int] | None = None  # fine-tuning: resample the position embedding to this size
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.05  # DeiT's AdamW weight decay; not applied to norms, biases, pos. emb. and tokens
    warmup_epochs: float = 3.0  # linear warmup from lr/100 (DeiT uses 5 of 300 epochs; small runs need fewer)
    min_lr: float = 1e-5  # cosine decays to this
    label_smoothing: float = 0.1  # DeiT / AugReg
    grad_clip: float = 1.0  # global-norm clipping at 1, as in the ViT paper (App. B.1)
    augment: Augment = "basic"  # none | basic (crop with padding + flip where sensible) | strong (+ random erasing)
    translate: float = 0.125  # crop padding as a fraction of the side (CIFAR's classic 4 px of 32)
    seed: int = 0
    save_every: int = 0  # keep a checkpoint every N epochs (0: only the final one)
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    num_workers: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["img_size"] = list(self.img_size) if self.img_size else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        if data.get("img_size"):
            data["img_size"] = tuple(data["img_size"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# Presets: settings measured to work (see docs/training.md for accuracy and time on a 2-core CPU).
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded demo model: 32x32 grey digits, patch 4 -> an 8x8 grid worth looking at. Digits are centred, so
    # crops are padded by a quarter of the side (+-8 px = +-2 patches): every position then sees strokes, and the
    # position embeddings learn a clean 2-D structure (docs/training.md has the numbers). 8 heads of width 8 give
    # more spread in attention distance than 4 of width 16 at the same cost.
    "demo": dict(
        data="digits",
        arch="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=8, mlp_ratio=2.0),
        epochs=40,
        batch_size=64,
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=3.0,
        augment="basic",
        translate=0.25,
        seed=0,
    ),
    # A small ViT for 32x32 CIFAR-10 photos: patch 4 (8x8 grid), 6 layers of width 192.
    "cifar10-tiny": dict(
        data="cifar10",
        arch="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0),
        epochs=50,
        batch_size=128,
        lr=1e-3,
        weight_decay=0.05,
        warmup_epochs=5.0,
        augment="basic",
        seed=0,
    ),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}': choose from {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


def _validate(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, f"--epochs must be at least 1, not {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, not {config.batch_size}"),
        (config.lr > 0, f"--lr must be positive, not {config.lr}"),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0, not {config.weight_decay}"),
        (config.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, not {config.warmup_epochs}"),
        (0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1), not {config.label_smoothing}"),
        (config.save_every >= 0, f"--save-every must be >= 0, not {config.save_every}"),
        (config.augment in ("none", "basic", "strong"), "--augment must be none, basic or strong"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
