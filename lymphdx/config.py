"""Typed configuration: presets shipped as YAML package data, validated on load.

Unknown keys and wrong types are errors that name the key (``ConfigError``). A run folder
holds the fully resolved ``config.yaml``; loading it back gives the same ``Config``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lymphdx.errors import ConfigError

__all__ = ["Config", "load_config", "PRESETS", "STRATEGIES", "dump_config"]

PRESETS = ("quick", "paper")
STRATEGIES = ("supervised", "semi-supervised", "multitask", "ssmdmt")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """Patient-wise split proportions (train, val, test) used when a manifest has no split."""

    weak: tuple[float, float, float] = (90, 10, 23)
    strong: tuple[float, float, float] = (62, 7, 16)


class DataConfig(_Section):
    """Preprocessing: every volume is resampled onto a canonical grid of ``shape`` voxels.

    ``spacing`` and ``shape`` are in ITK order (x, y, z). ``fit``: ``crop`` keeps
    ``spacing`` and centre-crops/pads the field of view; ``resize`` stretches the whole
    field of view onto ``shape`` (spacing then follows from each scan).
    """

    spacing: tuple[float, float, float] = (5.0, 5.0, 6.0)
    shape: tuple[int, int, int] = (48, 48, 32)
    fit: Literal["crop", "resize"] = "crop"
    hu_window: tuple[float, float] = (-250.0, 350.0)
    cache_dir: str | None = None  # default: $LYMPHDX_CACHE or ~/.cache/lymphdx
    split_seed: int = 0  # seeds the patient-wise split; shared by all runs of a comparison
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if min(self.spacing) <= 0 or min(self.shape) < 1:
            raise ValueError("spacing and shape must be positive")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError("hu_window must be (low, high) with low < high")
        return self


class ModelConfig(_Section):
    """3-D DenseNet encoder f, classifier σ (two FC layers) and ROI decoder g."""

    init_features: int = 16
    growth_rate: int = 8
    block_layers: tuple[int, ...] = (2, 2, 2, 2)
    decoder_layers: tuple[int, ...] | None = None  # default: same as block_layers
    bn_size: int = 2
    stem_stride: int = 2
    dropout: float = 0.0
    classifier_hidden: int = 32
    pool: Literal["avg", "max", "avgmax"] = "avgmax"
    decoder_skips: bool = False
    norm: Literal["batch", "instance", "group"] = "batch"
    checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not self.block_layers or min(self.block_layers) < 1:
            raise ValueError("block_layers needs at least one block of at least one layer")
        if self.decoder_layers is not None and len(self.decoder_layers) != len(self.block_layers):
            raise ValueError("decoder_layers must have as many blocks as block_layers")
        if self.stem_stride not in (1, 2, 4):
            raise ValueError("stem_stride must be 1, 2 or 4")
        return self

    @property
    def downsampling(self) -> int:
        """Input size / embedding size along each axis."""
        return self.stem_stride * 2 ** (len(self.block_layers) - 1)


class LossConfig(_Section):
    """Weights of the four loss terms (paper: all 1)."""

    cls: float = 1.0
    roi: float = 1.0
    pseudo_cls: float = 1.0
    pseudo_roi: float = 1.0


class PropagationConfig(_Section):
    """Label propagation between the two sets (paper §3.2)."""

    warmup_epochs: int = 4
    every: int = 2
    roi_threshold: float = Field(0.8, ge=0.0, le=1.0)  # ζ
    pseudo_labels: Literal["hard", "soft"] = "hard"
    confidence: float = Field(0.0, ge=0.0, le=1.0)  # keep strong scans with |2p-1| >= this


class TrainingConfig(_Section):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(4, ge=1)
    strong_batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    flip_augment: bool = True
    num_threads: int | None = None
    loss: LossConfig = Field(default_factory=LossConfig)


class EvaluationConfig(_Section):
    bootstrap: int = Field(2000, ge=100)
    ci: float = Field(0.95, gt=0, lt=1)
    threshold: float = Field(0.5, ge=0, le=1)


class ManifestConfig(_Section):
    """The run's data: the two manifests (absolute paths once resolved)."""

    weak: str | None = None
    strong: str | None = None


class Config(_Section):
    """The whole resolved configuration of a run."""

    preset: str = "quick"
    strategy: Literal["supervised", "semi-supervised", "multitask", "ssmdmt"] = "ssmdmt"
    seed: int = 0
    manifests: ManifestConfig = Field(default_factory=ManifestConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    propagation: PropagationConfig = Field(default_factory=PropagationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _check_shape(self) -> Config:
        factor = self.model.downsampling
        if any(s % factor for s in self.data.shape):
            raise ValueError(
                f"data.shape {list(self.data.shape)} must be divisible by the model's "
                f"downsampling factor {factor} (stem_stride x 2^(blocks-1))"
            )
        return self


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path | str, label: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config {label}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {label} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {label} must be a mapping of keys to values")
    return data


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("lymphdx.configs").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def validate(data: dict[str, Any], label: str = "config") -> Config:
    """Validate a config mapping; errors name the offending key."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown key {key!r}")
            else:
                lines.append(f"key {key!r}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid {label}: " + "; ".join(lines)) from None


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Preset (``quick`` by default, or the file's ``preset`` key) + YAML file + overrides."""
    user = _read_yaml(Path(path), str(path)) if path is not None else {}
    name = preset or user.get("preset") or "quick"
    data = _merge(_preset(str(name)), user)
    data["preset"] = name
    if overrides:
        data = _merge(data, overrides)
    return validate(data, str(path) if path else f"preset {name!r}")


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (lists for tuples, so ``safe_load`` reads it)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
