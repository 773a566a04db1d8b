"""Command line: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand, TyperGroup

from lymphdx import __version__
from lymphdx.cli_common import (  # SEED_LIMIT, Preset: cli's names too (tests read them)
    SEED_LIMIT,  # noqa: F401
    ConfigOpt,
    EpochsOpt,
    Preset,  # noqa: F401
    PresetOpt,
    _check_at_least,
    _check_cache,
    _check_out_folder,
    _check_seed,
    _config,
)
from lymphdx.cli_compare import compare_cmd
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import dumps_json, folder_problem, path_problem

# the choices of --split, --domain, --strategy and --preset, listed by --help
# (tests/test_bad_input_cli.py checks them against lymphdx's own lists)
Split = Literal["train", "val", "test"]
Domain = Literal["weak", "strong"]
Strategy = Literal["supervised", "semi-supervised", "multitask", "ssmdmt", "ssmdmt-plus"]
Region = Literal["abd", "med", "all"]
Phantom = Literal["scaled", "realistic"]  # lymphdx.data.synthetic.PHANTOMS
ExportFormat = Literal["torchscript", "onnx", "bundle"]  # lymphdx.workflows.export.FORMATS


def _flags_without_type(params: list[Any]) -> list[Any]:
    """On/off flags (``--resume``, ``--help``) take no value: show no ``<bool>`` type for
    them in ``--help`` (typer's rich help shows one for every flag)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Semi-supervised multi-domain multi-task CT classification of metastatic lymph nodes.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lymphdx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    pass


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn lymphdx errors into one clear line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LymphdxError as err:
            typer.echo(f"lymphdx: error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:  # a folder that is not writable, a full disk, ...
            # name the file being written, not its temporary stand-in (fileutil.atomic_path)
            names = [
                repr(re.sub(r"\.tmp-[0-9a-f]{8}-", "", str(n)))
                for n in (err.filename, err.filename2)
                if n is not None
            ]
            where = f": {' -> '.join(names)}" if names else ""
            message = f"{err.strerror or err}{where}"
            if isinstance(err, (FileExistsError, NotADirectoryError)) and names:
                # a folder to be made whose name, or a name above it, is a file
                problem = folder_problem(re.sub(r"\.tmp-[0-9a-f]{8}-", "", str(err.filename)))
                if problem is not None:
                    message = f"cannot make the folder {names[0]}: {problem}"
            typer.echo(f"lymphdx: error: {message}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("lymphdx: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


EnsembleOpt = Annotated[
    str | None, typer.Option("--strategy", help="With a compare folder: ensemble of its runs of S.")
]


@app.command(cls=_Command)
@_friendly
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    n_weak: Annotated[int, typer.Option(help="Weak-set scans.")] = 123,
    n_pos: Annotated[
        int | None,
        typer.Option(
            help="Positive weak-set scans, in [0, --n-weak]. Default: the paper's prevalence, "
            "round(n_weak x 57/123).",
            show_default=False,
        ),
    ] = None,
    n_strong: Annotated[int, typer.Option(help="Strong-set scans.")] = 85,
    seed: Annotated[int, typer.Option(help="Seed, in [0, 2**32 - 1].")] = 0,
    shift: Annotated[
        float,
        typer.Option(
            "--shift",
            help="How far hospital B's acquisition (calibration, contrast phase, noise, "
            "texture, PSF, voxel spacing) lies from A's: 0 = like A's, 1 = default, "
            "2 = twice the default difference. >= 0.",
        ),
    ] = 1.0,
    node_scale: Annotated[
        float,
        typer.Option(
            "--node-scale",
            help="Multiplies every node's diameter range (both hospitals, benign and "
            "metastatic): 0.6 = nodes 0.6x as large relative to the voxel. In (0, 2].",
        ),
    ] = 1.0,
    resolution: Annotated[
        str,
        typer.Option(
            "--resolution",
            help="The grid the scans are written on, the same patients in mm with the field "
            "of view kept: 'default' (A 4x4x5 mm, B 3.5x3.5x4 mm), 'clinical' (A 0.8x0.8x2.5 "
            "mm, 400x400x96; B 0.7x0.7x2 mm, 480x480x112) or IN,SLICE: hospital A's in-plane "
            "and slice spacing in mm, e.g. 1.5,2 (B keeps 7/8 and 4/5 of A's).",
        ),
    ] = "default",
    phantom: Annotated[
        Phantom,
        typer.Option(
            "--phantom",
            help="Node population: 'scaled' (today's, nodes large enough for the quick grid) "
            "or 'realistic' (real abdominal sizes, benign short axis mostly under 10 mm; "
            "malignancy by size, roundness, necrosis, texture, margin).",
        ),
    ] = "scaled",
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", min=1, help="Processes (default: 2 on 2+ cores)."),
    ] = None,
) -> None:
    """Write the synthetic two-hospital data set (NIfTI + manifests)."""
    from lymphdx.data.synthetic import SynthSpec, write_synthetic

    # every check before the output folder exists (SynthSpec repeats them for the library)
    _check_at_least(n_weak, "--n-weak", 0)
    _check_at_least(n_strong, "--n-strong", 0)
    if n_pos is not None and not 0 <= n_pos <= n_weak:
        raise LymphdxError(f"--n-pos must be in [0, --n-weak = {n_weak}], got {n_pos}")
    _check_seed(seed)
    _check_out_folder(out)
    try:
        spec = SynthSpec(
            n_weak=n_weak,
            n_pos=n_pos,
            n_strong=n_strong,
            seed=seed,
            shift=shift,
            node_scale=node_scale,
            resolution=resolution,
            phantom=phantom,
        )
    except ValueError as err:
        raise LymphdxError(f"invalid synth options: {err}") from None
    summary = write_synthetic(out, spec, jobs=jobs or min(2, os.cpu_count() or 1))
    typer.echo(dumps_json(summary))
    typer.echo(f"weak manifest:   {out / 'weak' / 'manifest.csv'}")
    typer.echo(f"strong manifest: {out / 'strong' / 'manifest.csv'}")


@app.command("train", cls=_Command)
@_friendly
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder.")],
    weak: Annotated[Path | None, typer.Option("--weak", help="Weak (label) manifest CSV.")] = None,
    strong: Annotated[
        Path | None, typer.Option("--strong", help="Strong (ROI) manifest CSV.")
    ] = None,
    strategy: Annotated[
        Strategy | None,
        typer.Option(
            metavar="<name>",
            help="supervised, semi-supervised, multitask, ssmdmt or ssmdmt-plus "
            "(default: the config's).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    seed: Annotated[
        int | None, typer.Option(help="Override seed, in [0, 2**32 - 1].", show_default=False)
    ] = None,
    epochs: EpochsOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
) -> None:
    """Train one strategy (under torchrun: one process per rank, see the README)."""
    from lymphdx.engine.distributed import is_main_process
    from lymphdx.engine.train import train

    # the command line's own values first, so that a refusal names the option, not the
    # config file, and comes before the run folder exists
    _check_seed(seed)
    _check_at_least(epochs, "--epochs")
    _check_out_folder(out)
    if resume and not (out / "config.yaml").exists():
        what = path_problem(out) or "holds no run (no config.yaml)"
        raise LymphdxError(
            f"cannot --resume: the run folder {str(out)!r} {what}; give the --out of an "
            "earlier run, or train without --resume"
        )
    over: dict[str, Any] = {"strategy": strategy, "seed": seed}
    if epochs is not None:
        over["training"] = {"epochs": epochs}
    if resume and config is None:
        config = out / "config.yaml"  # the run's own config (+ --epochs to extend it)
    cfg = _config(config, preset, over)
    if (weak is None or strong is None) and not (cfg.manifests.weak and cfg.manifests.strong):
        raise LymphdxError("give --weak and --strong manifests (or a config that names them)")
    _check_cache(cfg.data.cache_dir)
    result = train(cfg, out, weak, strong, resume=resume, progress=sys.stderr.isatty())
    if is_main_process():
        typer.echo(dumps_json(result))


@app.command(cls=_Command)
@_friendly
def evaluate(
    runs: Annotated[list[Path], typer.Argument(help="Run folder (or an ensemble's: see --weak).")],
    split: Annotated[Split | None, typer.Option(help="Weak-set split to score.")] = None,
    strategy: EnsembleOpt = None,
    weak: Annotated[
        Path | None,
        typer.Option("--weak", help="Score the ensemble of RUNS on this weak manifest's patients."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="With --weak: output folder.")] = None,
) -> None:
    """Score the run's best model on a split (default test); writes RUN/metrics.json. With
    --weak: the ensemble of RUNS (or of COMPARE --strategy S) and each member on new
    patients; writes ensemble_metrics.json (in COMPARE/ensemble/S by default)."""
    from lymphdx.engine.run_folder import load_run_config
    from lymphdx.workflows.ensemble_evaluate import evaluate_models

    if weak is None and len(runs) == 1:
        _check_cache(load_run_config(runs[0]).data.cache_dir)
    typer.echo(dumps_json(evaluate_models(runs, split, strategy, weak, out)))


@app.command(cls=_Command)
@_friendly
def predict(
    model: Annotated[
        list[Path],
        typer.Option("--model", help="Run folder; repeat it, or a compare folder + --strategy."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Scans: NIfTI/NRRD/MHA files, DICOM series folders, or folders of them."
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            help="A CSV with patient_id and image columns (e.g. a weak manifest): its scans.",
        ),
    ] = None,
    domain: Annotated[
        Domain,
        typer.Option(
            help="The training hospital whose normalisation to use: weak (the weak set's, "
            "for scans like it) or strong."
        ),
    ] = "weak",
    series_uid: Annotated[
        str | None,
        typer.Option(
            "--series-uid",
            metavar="UID",
            help="For a DICOM folder that holds several series: the SeriesInstanceUID of "
            "the one to read (an error lists the folder's series). Every DICOM folder "
            "given must hold it.",
            show_default=False,
        ),
    ] = None,
    strategy: EnsembleOpt = None,
) -> None:
    """Predict metastasis probability, ROI maps and node findings; writes OUT/<name>/...
    and OUT/summary.csv. A bad scan is reported and the others go on."""
    from lymphdx.workflows.ensemble import predict_models
    from lymphdx.workflows.predict import scan_inputs

    scans = scan_inputs(images or [], manifest)
    if not scans:
        raise LymphdxError("no scans: give scan files or folders, or --manifest")
    paths, patients = [p for p, _ in scans], [q for _, q in scans]
    if series_uid is not None and not any(p.is_dir() for p in paths):
        raise LymphdxError(
            "--series-uid picks a series in a DICOM folder, but no scan given is a DICOM "
            "folder; leave it out for NIfTI, NRRD and MetaImage files"
        )
    for r in predict_models(
        model,
        paths,
        out,
        strategy=strategy,
        domain=domain,
        patients=patients,
        progress=True,
        series_uid=series_uid,
    ):
        nodes = len(r["findings"])
        typer.echo(
            f"{r['image']}: probability {r['probability']:.3f} label {r['label']}, "
            f"{nodes} node candidate{'s' if nodes != 1 else ''}"
        )


app.command("compare", cls=_Command)(_friendly(compare_cmd))


@app.command(cls=_Command)
@_friendly
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("demo_out"),
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per strategy.")] = 1,
    epochs: EpochsOpt = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", min=1, help="Runs trained at once (default: 2 on 2+ cores)."),
    ] = None,
) -> None:
    """Synthetic data + compare of the four strategies with the quick preset."""
    from lymphdx.core.config import load_config
    from lymphdx.data.synthetic import SynthSpec, write_synthetic
    from lymphdx.reporting.table import format_table
    from lymphdx.workflows.compare import compare

    _check_at_least(seeds, "--seeds")
    _check_at_least(epochs, "--epochs")
    _check_out_folder(out)
    start = time.perf_counter()
    data = out / "data"
    if (
        not (data / "weak" / "manifest.csv").exists()
        or not (data / "strong" / "manifest.csv").exists()
    ):
        typer.echo(f"[demo] writing the synthetic two-hospital data set to {data}")
        write_synthetic(data, SynthSpec(), jobs=jobs or min(2, os.cpu_count() or 1))
    over: dict[str, Any] = {"data": {"cache_dir": str(out / "cache")}}
    if epochs:
        over["training"] = {"epochs": epochs}
    cfg = load_config(preset="quick", overrides=over)
    results = compare(
        cfg,
        data / "weak" / "manifest.csv",
        data / "strong" / "manifest.csv",
        out / "compare",
        None,
        list(range(seeds)),
        jobs=jobs or min(2, os.cpu_count() or 1),
    )
    typer.echo("")
    typer.echo(format_table(results))
    typer.echo(f"[demo] finished in {time.perf_counter() - start:.0f} s; see {out / 'compare'}")


@app.command(cls=_Command)
@_friendly
def report(
    folder: Annotated[Path, typer.Argument(help="A run folder or a compare folder.")],
) -> None:
    """Write FOLDER/report.html (self-contained) and FOLDER/report_predictions.csv."""
    from lymphdx.workflows.report import write_report

    typer.echo(str(write_report(folder)))


@app.command("export", cls=_Command)
@_friendly
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder (quick or paper preset).")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="What to write.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (new, empty or an export).")],
    domain: Annotated[
        Domain, typer.Option(help="Hospital whose normalisation to build in.")
    ] = "weak",
) -> None:
    """Export the network with its preprocessing settings (export.json): model.ts, model.onnx
    or a MONAI Bundle (python -m monai.bundle run --config_file OUT/configs/inference.json)."""
    from lymphdx.workflows.export import export

    typer.echo(dumps_json(export(run, out, fmt, domain=domain)))


@app.command("prepare-tcia", cls=_Command)
@_friendly
def prepare_tcia_cmd(
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="The unpacked TCIA CT Lymph Nodes download (DICOM, masks, annotations)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Strong-set manifest CSV to write.")],
    region: Annotated[
        Region,
        typer.Option("--region", help="abd (the paper's abdominal cases), med or all."),
    ] = "abd",
) -> None:
    """Write a strong-set manifest for the TCIA "CT Lymph Nodes" download."""
    from lymphdx.io.tcia import prepare_tcia, report_path

    report = prepare_tcia(root, out, region)
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"report: {report_path(out)}")


def main() -> None:
    """Entry point of the ``lymphdx`` console script."""
    app()
