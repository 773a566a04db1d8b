"""Typed configuration: presets shipped as YAML package data, validated on load.

Unknown keys and wrong types are errors that name the key (``ConfigError``). A run folder
holds the fully resolved ``config.yaml``; loading it back gives the same ``Config``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lymphdx.core.config_compare import CompareConfig
from lymphdx.core.config_sections import (
    SEED_MAX,
    AugmentationConfig,
    DataConfig,
    EvaluationConfig,
    InferenceConfig,
    LossConfig,
    ManifestConfig,
    ModelConfig,
    PropagationConfig,
    SplitConfig,
    TrainingConfig,
    _check_seed,
    _Section,
)
from lymphdx.core.errors import ConfigError
from lymphdx.core.files import path_problem
from lymphdx.core.strategies import PAPER_STRATEGIES, STRATEGY_DEFAULTS
from lymphdx.core.strategies import STRATEGIES as STRATEGY_FLAGS

__all__ = [
    "AugmentationConfig",
    "CompareConfig",
    "Config",
    "DataConfig",
    "EvaluationConfig",
    "InferenceConfig",
    "LossConfig",
    "ManifestConfig",
    "ModelConfig",
    "PAPER_STRATEGIES",
    "PRESETS",
    "PropagationConfig",
    "SEED_MAX",
    "STRATEGIES",
    "SplitConfig",
    "TrainingConfig",
    "dump_config",
    "load_config",
]

PRESETS = ("quick", "paper", "clinical")
# the paper's four (Table I, in order), then the strategies that add options beyond the paper
STRATEGIES = tuple(STRATEGY_FLAGS)


class Config(_Section):
    """The whole resolved configuration of a run."""

    preset: str = "quick"
    strategy: Literal[STRATEGIES] = "ssmdmt"  # type: ignore[valid-type]
    seed: int = 0
    manifests: ManifestConfig = Field(default_factory=ManifestConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    propagation: PropagationConfig = Field(default_factory=PropagationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)  # where compare trains runs

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        return _check_seed(v)

    @model_validator(mode="after")
    def _check_shape(self) -> Config:
        factor = self.model.downsampling
        if self.data.shape is not None and any(s % factor for s in self.data.shape):
            raise ValueError(
                f"data.shape {list(self.data.shape)} must be divisible by the model's "
                f"downsampling factor {factor} (stem_stride x 2^(blocks-1))"
            )
        return self

    @model_validator(mode="after")
    def _check_tile(self) -> Config:
        tile, factor = self.inference.tile, self.model.downsampling
        if self.evaluation.inferer == "sliding_window" and any(t % factor for t in tile):
            raise ValueError(
                f"inference.tile {list(tile)} must be divisible by the model's downsampling "
                f"factor {factor} (stem_stride x 2^(blocks-1)) for evaluation.inferer "
                "sliding_window"
            )
        return self

    @model_validator(mode="after")
    def _check_patch(self) -> Config:
        patch = self.training.roi_patch
        factor = self.model.downsampling
        if patch is not None and any(p % factor or p <= 0 for p in patch):
            raise ValueError(
                f"training.roi_patch {list(patch)} must be divisible by the model's "
                f"downsampling factor {factor} (a patch larger than data.shape is cut to it)"
            )
        if patch is not None and self.model.norm == "domain_batch":
            raise ValueError(
                "model.norm domain_batch routes each forward pass's scans by hospital and "
                "does not support training.roi_patch (a second forward pass of strong "
                "patches); set training.roi_patch: null"
            )
        return self

    @model_validator(mode="after")
    def _check_sampler(self) -> Config:
        """Whole scans of their own size cannot be batched: ``data.fit: whole`` needs the
        tile sampler, which needs the sliding-window inferer and ROI patches."""
        t = self.training
        if self.data.fit == "whole" and t.sampler != "tiles":
            raise ValueError(
                "data.fit: whole gives every scan a grid of its own size: set "
                "training.sampler: tiles (the network then sees tiles, not whole scans)"
            )
        if t.sampler == "tiles":
            missing = []
            if self.evaluation.inferer != "sliding_window":
                missing.append("evaluation.inferer: sliding_window")
            if t.roi_patch is None:
                missing.append("training.roi_patch (the ROI loss's patch, x y z voxels)")
            if self.model.norm == "domain_batch":
                missing.append("model.norm other than domain_batch")
            if missing:
                raise ValueError(
                    "training.sampler: tiles reads scans as bags of tiles and needs "
                    + "; ".join(missing)
                )
        factor = self.model.downsampling
        bag = self.inference.bag_tile
        if bag is not None and any(v % factor for v in bag):
            raise ValueError(
                f"inference.bag_tile {list(bag)} (the classifier's bags' tiles) must be "
                f"divisible by the model's downsampling factor {factor}"
            )
        return self

    @model_validator(mode="after")
    def _check_validation_schedule(self) -> Config:
        """Selection on validation needs every epoch validated; SWA's batch-norm pass reads
        whole volumes, not bags."""
        t = self.training
        if t.validate_every > 1 and t.selection not in ("last", "ema_last"):
            raise ValueError(
                f"training.validate_every {t.validate_every} validates only some epochs, but "
                f"training.selection {t.selection} chooses among all of them: use selection "
                "last or ema_last, or validate_every 1"
            )
        if t.sampler == "tiles" and t.selection == "swa":
            raise ValueError(
                "training.selection swa recomputes batch-norm statistics on whole volumes, "
                "which training.sampler tiles does not have: use ema_last, last, ema or best_val"
            )
        return self

    @model_validator(mode="after")
    def _strategy_defaults(self) -> Config:
        """Fill the keys the user left unset with the strategy's defaults
        (``strategies.STRATEGY_DEFAULTS``), then check the propagation options together.

        A filled key stays *unset* for pydantic, so ``model_dump(exclude_unset=True)``
        (what ``compare`` re-validates for each strategy) drops it and another strategy
        gets its own defaults; ``dump_config`` writes it, so ``config.yaml`` holds the
        resolved value and reproduces the run alone.
        """
        for section_name, values in STRATEGY_DEFAULTS.get(self.strategy, {}).items():
            section = getattr(self, section_name)
            for key, value in values.items():
                if key not in section.model_fields_set:
                    section.__dict__[key] = value  # valid by test; not marked as set
        p = self.propagation
        if p.roi_ignore_low is not None and p.roi_ignore_low > p.roi_threshold:
            raise ValueError(
                f"propagation.roi_ignore_low ({p.roi_ignore_low}) must not exceed "
                f"propagation.roi_threshold ζ ({p.roi_threshold}): the ignore band is [low, ζ]"
            )
        return self


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path | str, label: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        problem = path_problem(path)  # a loop of links, not "Too many levels of ..."
        why = f"it {problem}" if problem else err.strerror
        raise ConfigError(f"cannot read config {label}: {why}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config {label} is not valid YAML{where}: {problem}") from None
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
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown key {key!r}")
            elif e["type"] == "value_error":  # our validators: the message says it all
                message = e["msg"].removeprefix("Value error, ")
                got = e.get("input")
                shown = "" if isinstance(got, dict) else f" (got {got!r})"
                lines.append(f"key {key!r}: {message}{shown}" if key else message)
            else:
                lines.append(f"key {key or '(top level)'!r}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid {label}: " + "; ".join(lines)) from None


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Preset (``quick`` by default, or the file's ``preset`` key) + YAML file + overrides."""
    user = _read_yaml(Path(path), str(path)) if path is not None else {}
    name = preset or user.get("preset") or "quick"
    data = merge(_preset(str(name)), user)
    data["preset"] = name
    if overrides:
        data = merge(data, overrides)
    return validate(data, str(path) if path else f"preset {name!r}")


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (lists for tuples, so ``safe_load`` reads it)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
