"""Options shared by many commands, defined once so that they mean the same everywhere."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vitlens.errors import UsageError

if TYPE_CHECKING:
    from vitlens.models.vit import ViT

MODEL_PANEL = "Model"
DATA_PANEL = "Data"
OUTPUT_PANEL = "Output"

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Checkpoint file (.safetensors .pth .pt .bin .ckpt .npz), timm name, hf-hub:org/name, or 'demo'.",
        show_default="demo",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch", help="timm architecture for a plain state dict (else inferred).", rich_help_panel=MODEL_PANEL
    ),
]
NumHeadsOpt = Annotated[
    int | None,
    typer.Option(
        "--num-heads", help="Heads per layer (not stored in weights; else guessed).", rich_help_panel=MODEL_PANEL
    ),
]
ModelKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--model-kwargs",
        help="JSON of extra timm.create_model kwargs.",
        rich_help_panel=MODEL_PANEL,
    ),
]
ImgSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--img-size", help="Input size: one int or H,W; resamples position embeddings.", rich_help_panel=MODEL_PANEL
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="auto | cpu | cuda | cuda:N | mps (auto picks CUDA when present).", rich_help_panel=MODEL_PANEL
    ),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--pretrained/--no-pretrained", help="For timm names: fetch pretrained weights.", rich_help_panel=MODEL_PANEL
    ),
]
CheckpointKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint-key",
        help="Which model of a file holding several: teacher, student, model_ema, or a key prefix (e.g. net).",
        rich_help_panel=MODEL_PANEL,
    ),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean",
        help="Input mean per channel, e.g. 0.5,0.5,0.5 (else the source's; see info).",
        rich_help_panel=MODEL_PANEL,
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option(
        "--std", help="Input std per channel, e.g. 0.5,0.5,0.5 (else the source's).", rich_help_panel=MODEL_PANEL
    ),
]
CropPctOpt = Annotated[
    float | None,
    typer.Option(
        "--crop-pct",
        help="Resize to size / crop-pct, then centre-crop (else the source's).",
        rich_help_panel=MODEL_PANEL,
    ),
]
InterpolationOpt = Annotated[
    str | None,
    typer.Option(
        "--interpolation",
        help="Resize filter: bilinear | bicubic | nearest | lanczos | box | hamming (else the source's).",
        rich_help_panel=MODEL_PANEL,
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        show_default=False,
        help="Images per forward pass (default: 8 on the CPU, where it runs fastest; 64 on CUDA and MPS).",
        rich_help_panel=DATA_PANEL,
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="digits | cifar10 | cifar100 | mnist | fashion-mnist | svhn | stl10 | flowers102 | oxford-iiit-pet | DIR.",
        rich_help_panel=DATA_PANEL,
    ),
]
SplitOpt = Annotated[
    str,
    typer.Option(
        "--split",
        help="train | test | all.",
        rich_help_panel=DATA_PANEL,
    ),
]
NumImagesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-images", help="Stratified subset of this many images (fixed seed).", rich_help_panel=DATA_PANEL
    ),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="Where torchvision datasets live.",
        rich_help_panel=DATA_PANEL,
    ),
]
DownloadOpt = Annotated[
    bool,
    typer.Option(
        "--download",
        help="Download a torchvision dataset if absent.",
        rich_help_panel=DATA_PANEL,
    ),
]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        help="Output directory.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print exactly one JSON object on stdout; all else goes to stderr.", rich_help_panel=OUTPUT_PANEL
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No summary or progress; errors only.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]


# The model options every command that loads a model takes, in order: (parameter, annotation, default).
_MODEL_PARAMETERS = (
    ("model", ModelArg, None),
    ("arch", ArchOpt, None),
    ("num_heads", NumHeadsOpt, None),
    ("model_kwargs", ModelKwargsOpt, None),
    ("img_size", ImgSizeOpt, None),
    ("device", DeviceOpt, "auto"),
    ("pretrained", PretrainedOpt, True),
    ("checkpoint_key", CheckpointKeyOpt, None),
    ("mean", MeanOpt, None),
    ("std", StdOpt, None),
    ("crop_pct", CropPctOpt, None),
    ("interpolation", InterpolationOpt, None),
)


def with_model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the model options (MODEL, ``--arch``, ``--num-heads``, ... ``--interpolation``) in place of
    its ``vit_options: ModelOptions`` parameter, so that they are declared once and mean the same in every command.

    Typer reads a command's options from its signature: the wrapper's signature starts with the MODEL argument (the
    first positional argument of every command) and lists the other eleven options where ``vit_options`` stood; the
    wrapper hands the command one :class:`ModelOptions` built from them.
    """
    signature = inspect.signature(command, eval_str=True)
    if "vit_options" not in signature.parameters:
        raise TypeError(f"{command.__name__} has no vit_options parameter")
    (model, *options) = (
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
        for name, annotation, default in _MODEL_PARAMETERS
    )
    parameters = [model]
    for parameter in signature.parameters.values():
        parameters += options if parameter.name == "vit_options" else [parameter]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        options = ModelOptions(**{name: kwargs.pop(name) for name, _, _ in _MODEL_PARAMETERS})
        return command(vit_options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return wrapper


@dataclass(frozen=True)
class ModelOptions:
    """The model options of a command, parsed once."""

    model: str | None = None
    arch: str | None = None
    num_heads: int | None = None
    model_kwargs: str | None = None
    img_size: str | None = None
    device: str = "auto"
    pretrained: bool = True
    checkpoint_key: str | None = None
    mean: str | None = None
    std: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> ModelOptions:
        """The model options among a command's parameters (``locals()`` of the command: names are the fields')."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})

    def images_first(self, images: list[str] | None) -> tuple[ModelOptions, list[str]]:
        """``vitlens rollout photo.jpg``: a MODEL argument that is an image file or a folder is the first image, and
        the model is the default one. Returns the options and the images."""
        from dataclasses import replace

        from vitlens.data import IMAGE_EXTENSIONS

        images = list(images or [])
        model = self.model
        if model is not None and (Path(model).suffix.lower() in IMAGE_EXTENSIONS or Path(model).expanduser().is_dir()):
            return replace(self, model=None), [model, *images]
        return self, images

    def kwargs(self) -> dict[str, Any]:
        if not self.model_kwargs:
            return {}
        try:
            value = json.loads(self.model_kwargs)
        except json.JSONDecodeError as e:
            raise UsageError(f"--model-kwargs is not valid JSON: {e.msg} at character {e.pos}")
        if not isinstance(value, dict):
            raise UsageError("--model-kwargs must be a JSON object, e.g. '{\"drop_path_rate\": 0.1}'")
        return value

    def load(self) -> ViT:
        from vitlens.models.load import load_vit

        if self.num_heads is not None and self.num_heads < 1:
            raise UsageError(f"--num-heads must be positive, got {self.num_heads}")
        return load_vit(
            self.model,
            arch=self.arch,
            num_heads=self.num_heads,
            model_kwargs=self.kwargs(),
            img_size=self.img_size,
            device=self.device,
            pretrained=self.pretrained,
            checkpoint_key=self.checkpoint_key,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )


FIGURE_FORMATS = ("png", "svg", "pdf")
FormatOpt = Annotated[
    str,
    typer.Option("--format", help="Figure file format: png | svg | pdf.", rich_help_panel=OUTPUT_PANEL),
]


def check_format(fmt: str) -> str:
    """The ``--format`` value, lower-cased; a UsageError unless it is one of :data:`FIGURE_FORMATS`."""
    value = fmt.strip().lower()
    if value not in FIGURE_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FIGURE_FORMATS)}, not {fmt!r}")
    return value


def check_num_images(num_images: int | None) -> None:
    if num_images is not None and num_images <= 0:
        raise UsageError(f"--num-images must be a positive number, not {num_images}")
