"""What the command modules share: the config from ``--config``/``--preset`` and the
command line, the checks of option values that come before anything is written, and the
options several commands take. ``cli`` and ``cli_compare`` import it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import check_folder, folder_problem

# numpy seeds are unsigned 32-bit words: seeds are in [0, SEED_LIMIT)
SEED_LIMIT = 2**32
# the choices of --preset, listed by --help (tests/test_bad_input_cli.py checks them)
Preset = Literal["quick", "paper", "clinical"]


def _config(config: Path | None, preset: str | None, overrides: dict[str, Any]):
    from lymphdx.core.config import load_config

    return load_config(
        config, preset=preset, overrides={k: v for k, v in overrides.items() if v is not None}
    )


def _check_seed(value: int | None, option: str = "--seed") -> None:
    """Seeds seed numpy generators, which take unsigned 32-bit words."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise LymphdxError(
            f"{option} must be in [0, 2**32 - 1] = [0, {SEED_LIMIT - 1}], got {value}"
        )


def _check_at_least(value: int | None, option: str, least: int = 1) -> None:
    if value is not None and value < least:
        raise LymphdxError(f"{option} must be at least {least}, got {value}")


def _check_out_folder(out: Path, option: str = "--out") -> None:
    """A folder that cannot be made (it, or a folder above it, is a file): refused before
    anything is written."""
    problem = folder_problem(out)
    if problem is not None:
        raise LymphdxError(f"cannot write to {option} {str(out)!r}: {problem}")


def _check_cache(cache_dir: str | None) -> None:
    """The preprocessing cache folder (``data.cache_dir``, else ``$LYMPHDX_CACHE``, else
    ``~/.cache/lymphdx``, as ``run_data.cache_dir_of``) must be a folder or makeable, named
    by where it was set."""
    if cache_dir:
        check_folder(cache_dir, "preprocessing cache folder (config key data.cache_dir)")
    elif os.environ.get("LYMPHDX_CACHE"):
        check_folder(
            os.environ["LYMPHDX_CACHE"],
            "preprocessing cache folder (environment variable LYMPHDX_CACHE)",
        )
    else:
        check_folder(
            Path.home() / ".cache" / "lymphdx",
            "preprocessing cache folder (the default; set LYMPHDX_CACHE to move it)",
        )


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML config (overrides the preset).")
]
PresetOpt = Annotated[Preset | None, typer.Option("--preset", help="Default: quick.")]
EpochsOpt = Annotated[int | None, typer.Option(help="Override training.epochs (>= 1).")]
