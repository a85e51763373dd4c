"""``vitexplain`` command line: a thin shell over :mod:`vitexplain.run.job`.

Every method subcommand is generated from the method's declaration (:mod:`vitexplain.methods.base`):
its options, their checks and ``--help``. This module imports no torch, timm or numba until a command
runs, so ``--help`` answers at once.
"""
from __future__ import annotations

import inspect
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .methods.base import Explainer, Param
from .methods.registry import available_methods
from .render.colormaps import COLORMAPS
from .run.options import IMAGE_FORMATS, RATIOS_HELP, RenderOptions, SweepOptions, parse_ratios

if TYPE_CHECKING:
    from .io.inputs import Failure
    from .run.job import Job
    from .run.pipeline import RunSummary
    from .run.profiling import StageTimer

EXIT_CODES_HELP = "Exit codes: 0 all inputs explained; 1 some inputs failed (see manifest.jsonl); 2 usage error; 130 interrupted."
DEFAULT_MODEL = "deit_tiny_patch16_224"  # as vitexplain.models.DEFAULT_MODEL, which imports timm
console = Console(stderr=True)

MODEL_PANEL, OUTPUT_PANEL, RUN_PANEL, METHOD_PANEL, EVALUATE_PANEL = "Model", "Output", "Run", "Method", "Evaluation"


def choices(name: str, values) -> type[Enum]:
    return Enum(name, {value: value for value in values}, type=str)


DeviceChoice = choices("DeviceChoice", ("auto", "cpu", "cuda", "mps"))
ColormapChoice = choices("ColormapChoice", COLORMAPS)
FormatChoice = choices("FormatChoice", IMAGE_FORMATS)
BaselineChoice = choices("BaselineChoice", ("mean", "blur"))
ManifestChoice = choices("ManifestChoice", ("manifest.jsonl", "evaluation.jsonl"))

Inputs = Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively; never inside --out).", show_default=False)]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays, raw masks and manifest.jsonl.", rich_help_panel=OUTPUT_PANEL)]
ModelName = Annotated[str, typer.Option("--model", "-m", help="timm ViT name; pretrained weights via timm unless --checkpoint.", rich_help_panel=MODEL_PANEL)]
CheckpointPath = Annotated[Optional[Path], typer.Option("--checkpoint", help="Local state dict (.pth/.pt/.bin/.safetensors; plain or under 'state_dict'/'model') for --model.", rich_help_panel=MODEL_PANEL)]
LabelsPath = Annotated[Optional[Path], typer.Option("--labels", help="The head's class names: a text file (one per line), a JSON list, or a JSON object index → name; target classes may then be given by these names. Default: ImageNet's names for 1000-class heads (and timm's 12k/21k/22k label sets), class_<i> otherwise.", show_default=False, rich_help_panel=MODEL_PANEL)]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.", rich_help_panel=RUN_PANEL)]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="auto = CUDA, then MPS, then CPU.", rich_help_panel=RUN_PANEL)]
WorkersOpt = Annotated[Optional[int], typer.Option("--num-workers", "-j", min=0, help="DataLoader worker processes decoding images. Default: on CPU half the cores, at most 4; with a GPU, the cores not needed for writing, at most 12 (never more than the images).", show_default=False, rich_help_panel=RUN_PANEL)]
ColormapOpt = Annotated[ColormapChoice, typer.Option("--colormap", help="Heatmap colours.", rich_help_panel=OUTPUT_PANEL)]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity over the image.", rich_help_panel=OUTPUT_PANEL)]
SaveRawOpt = Annotated[bool, typer.Option("--save-raw", help="Also save each patch-grid mask as float32 .npy.", rich_help_panel=OUTPUT_PANEL)]
StretchOpt = Annotated[Optional[bool], typer.Option("--stretch/--no-stretch", help="Spread the colours over each mask's own min..max (overlays only; raw masks keep max 1). Default: the method's (on for flow).", show_default=False, rich_help_panel=OUTPUT_PANEL)]
ClassOpt = Annotated[Optional[list[str]], typer.Option("--class", "-c", help="Target class: ImageNet index or name ('243', 'tiger cat'); repeat for several. Default: each image's top-1.", rich_help_panel=METHOD_PANEL)]
MaxSideOpt = Annotated[Optional[int], typer.Option("--max-side", min=16, help="Downscale written pictures to this longer side in pixels. Default: the image's own size (sweep frames: 256).", show_default=False, rich_help_panel=OUTPUT_PANEL)]
FormatOpt = Annotated[FormatChoice, typer.Option("--format", help="Overlay file format: png (lossless) or jpg (quality 90: faster to write, ~6× smaller).", rich_help_panel=OUTPUT_PANEL)]
ProfileOpt = Annotated[bool, typer.Option("--profile", help="Report where the time went: decode, model, method, write.", rich_help_panel=RUN_PANEL)]
AmpOpt = Annotated[bool, typer.Option("--amp", help="Forward pass in bfloat16/float16 autocast (GPU; bfloat16 on CPU); attention math stays float32.", rich_help_panel=RUN_PANEL)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Recompute outputs that a previous run of the same request completed (default: skip them).", rich_help_panel=RUN_PANEL)]
RatiosOpt = Annotated[str, typer.Option("--ratios", help=f"Discard ratios: {RATIOS_HELP}.", rich_help_panel=METHOD_PANEL)]
FpsOpt = Annotated[float, typer.Option("--fps", min=0.1, max=50.0, help="GIF frames per second.", rich_help_panel=OUTPUT_PANEL)]
GifOpt = Annotated[bool, typer.Option("--gif/--no-gif", help="Write an animated, looping GIF per image.", rich_help_panel=OUTPUT_PANEL)]
GridOpt = Annotated[bool, typer.Option("--grid", help="Also write a contact sheet of all frames.", rich_help_panel=OUTPUT_PANEL)]
SCALE_PANEL = "Scaling out"
EngineChoice = choices("EngineChoice", ("local", "ray"))
ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="K/N: this process's share of the inputs (the sorted list's batches K, K+N, …), for launchers that start N processes (SLURM arrays, torchrun); each writes its own manifest part into the shared --out. Then: vitexplain compact OUT.", show_default=False, rich_help_panel=SCALE_PANEL)]
EngineOpt = Annotated[EngineChoice, typer.Option("--engine", help=escape("local: this process; ray: Ray Data actors on a Ray cluster (pip install 'vitexplain[ray]')."), rich_help_panel=SCALE_PANEL)]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join. Default: the running cluster, else a local instance started for the run.", show_default=False, rich_help_panel=SCALE_PANEL)]
RayWorkersOpt = Annotated[int, typer.Option("--ray-workers", min=1, help="Ray actors, each loading the model once.", rich_help_panel=SCALE_PANEL)]
CpusPerWorkerOpt = Annotated[float, typer.Option("--cpus-per-worker", min=0.0, help="CPUs each Ray actor reserves (and its torch threads).", rich_help_panel=SCALE_PANEL)]
GpusPerWorkerOpt = Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs each Ray actor reserves; above 0 it explains on CUDA.", rich_help_panel=SCALE_PANEL)]
RayLogsOpt = Annotated[bool, typer.Option("--ray-logs", help="Show Ray's own messages on the terminal; otherwise they go to OUT/ray.log.", rich_help_panel=SCALE_PANEL)]


def literal(text: object) -> str:
    """``text`` printed as it is: rich markup escaped, control characters (a newline in a file name) shown as
    escapes, so that no name can style the output or forge a line of its own."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))
    return escape(shown)


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {literal(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def report_failure(failure: Failure) -> None:
    console.print(f"[yellow]failed:[/] {literal(failure.path)}: {literal(failure.reason)}", highlight=False,
                  soft_wrap=True)


def warn(text: str) -> None:
    console.print(f"[yellow]warning:[/] {literal(text)}", highlight=False, soft_wrap=True)


def param_option(param: Param, panel: str = METHOD_PANEL, help_text: str | None = None) -> inspect.Parameter:
    """A command-line option for a method parameter. Its default is ``None`` (the method's own default
    applies, shown in the help unless ``help_text`` replaces it), so that the command can tell which
    parameters were given."""
    if param.choices is not None:
        kind: Any = choices(f"{param.name.title()}Choice", param.choices)
    else:
        kind = param.type
    default = f"{param.default:g}" if isinstance(param.default, float) else str(param.default)
    names = [f"{param.flag}/--no-{param.flag[2:]}"] if param.type is bool else [param.flag]
    text = help_text or f"{param.help} [default: {default}]"
    option = typer.Option(*names, help=escape(text), show_default=False, rich_help_panel=panel)
    return inspect.Parameter(param.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


COMMON = [
    ("out", OutDir, Path("vitexplain-out")), ("model", ModelName, DEFAULT_MODEL), ("checkpoint", CheckpointPath, None),
    ("labels", LabelsPath, None),
    ("batch_size", BatchOpt, 8), ("device", DeviceOpt, DeviceChoice.auto), ("num_workers", WorkersOpt, None),
    ("colormap", ColormapOpt, ColormapChoice.jet), ("alpha", AlphaOpt, 0.5), ("stretch", StretchOpt, None),
    ("save_raw", SaveRawOpt, False), ("max_side", MaxSideOpt, None), ("image_format", FormatOpt, FormatChoice.png),
    ("overwrite", OverwriteOpt, False), ("profile", ProfileOpt, False), ("amp", AmpOpt, False),
    ("shard", ShardOpt, None), ("engine", EngineOpt, EngineChoice.local), ("ray_address", RayAddressOpt, None),
    ("ray_workers", RayWorkersOpt, 1), ("cpus_per_worker", CpusPerWorkerOpt, 1.0), ("gpus_per_worker", GpusPerWorkerOpt, 0.0),
    ("ray_logs", RayLogsOpt, False),
]


EVALUATE_COMMON = ("model", "checkpoint", "labels", "batch_size", "device", "num_workers", "overwrite", "amp")


def option(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def value(v):
    return v.value if isinstance(v, Enum) else v


def method_command(method: type[Explainer]) -> Callable[..., None]:
    """The subcommand of ``method``: the common options, ``--class`` where it is class-specific, and one
    option per declared parameter."""

    def command(**options) -> None:
        params = {p.name: value(options.pop(p.name)) for p in method.params if options.get(p.name) is not None}
        for p in method.params:
            options.pop(p.name, None)
        run_command(method.name, options, params, sweep=None)

    parameters = [inspect.Parameter("inputs", inspect.Parameter.KEYWORD_ONLY, annotation=Inputs)]
    if method.class_specific:
        parameters.append(option("classes", ClassOpt, None))
    parameters += [param_option(p) for p in method.params]
    parameters += [option(*spec) for spec in COMMON]
    command.__signature__ = inspect.Signature(parameters)
    command.__name__ = method.name.replace("-", "_")
    return command


def sweep_command(methods: dict[str, type[Explainer]]) -> Callable[..., None]:
    """``sweep``: any sweepable method over many discard ratios; each parameter of those methods (but the
    discard ratio, which the sweep varies) is an option, and applies only to the methods declaring it."""
    sweepable = {name: m for name, m in methods.items() if m.sweepable()}
    params: dict[str, Param] = {}
    for m in sweepable.values():
        for p in m.params:
            if p.name != "discard_ratio":
                params.setdefault(p.name, p)
    MethodChoice = choices("MethodChoice", methods)
    MethodOpt = Annotated[MethodChoice, typer.Option("--method", help=f"Which explanation to sweep: {', '.join(sweepable)} "
                                                     "(the methods with a discard ratio).", rich_help_panel=METHOD_PANEL)]

    def command(**options) -> None:
        name = value(options.pop("method"))
        if name not in sweepable:
            raise fail(f"{name} has no discard ratio to sweep; sweep takes {', '.join(sweepable)}", code=2)
        given = {n: value(options.pop(n)) for n in params if options.get(n) is not None}
        for n in params:
            options.pop(n, None)
        declared = {p.name for p in sweepable[name].params}
        for n in given:
            if n not in declared:
                raise fail(f"{params[n].flag} does not apply to {name}", code=2)
        try:
            sweep = SweepOptions(parse_ratios(options.pop("ratios")), options.pop("gif"), options.pop("grid"),
                                 options.pop("fps"))
        except ValueError as error:
            raise fail(str(error), code=2) from None
        if not (sweep.gif or sweep.grid or options["save_raw"]):
            raise fail("nothing to write: give --gif, --grid or --save-raw", code=2)
        if options.get("classes") and not sweepable[name].class_specific:
            raise fail(f"--class applies to class-specific methods, not {name}", code=2)
        run_command(name, options, given, sweep)

    parameters = [inspect.Parameter("inputs", inspect.Parameter.KEYWORD_ONLY, annotation=Inputs),
                  option("method", MethodOpt, MethodChoice[next(iter(sweepable))]),
                  option("ratios", RatiosOpt, "0:0.95:20"), option("classes", ClassOpt, None)]
    parameters += [param_option(p) for p in params.values()]
    parameters += [option(*spec) for spec in COMMON]
    parameters += [option("fps", FpsOpt, 4.0), option("gif", GifOpt, True), option("grid", GridOpt, False)]
    command.__signature__ = inspect.Signature(parameters)
    command.__name__ = "sweep"
    return command


SWEEP_HELP = """The same image over many discard ratios, as an animated GIF (and --grid contact sheet).

One forward pass (and one backward for class-specific methods) per image, however many ratios. Example: vitexplain sweep img.png --method rollout --fusion max --ratios 0:0.99:20 --grid"""


EVALUATE_HELP = escape("""How faithful each method's maps are: deletion and insertion AUC, and the grid pointing game.

Deletion / insertion (RISE): the map ranks the model's patches; over --steps steps its top patches are set to the baseline (deletion: the score should fall fast, lower AUC is better) or restored from it (insertion: higher is better). The score is the softmax probability of the target: each image's top-1, or --class.

Positive / negative perturbation (Chefer et al., --metrics positive,negative): the map's top (positive) or bottom (negative) 0, 10, …, 90% of patches set to the baseline; the score is whether the top-1 class is still the target; AUC = np.trapz(accuracy, fractions) × 100 over the images (positive: lower is better; negative: higher).

Grid pointing game (B-cos): 2×2 grids of four inputs with different predicted classes; each tile's class is explained and read three ways: share (of the map's mass in the tile; chance 0.25; sharpening a map raises it), hit (the map's highest patch in the tile; chance 0.25) and AUROC (a tile patch outranks an outside one; chance 0.5). Hit and AUROC depend only on the order of the patches. Class-specific methods only. A random map is always evaluated, as the baseline row.

Per-method settings go in brackets: --methods 'rollout[fusion=max,discard-ratio=0.95],legrad[layers=1]'. A method option given as a flag (--discard-ratio 0.5) applies to every listed method that has it.

Writes evaluation.jsonl (one line per input × method × target, with the curves), summary.json, summary.csv and curves.png into --out; reruns skip what is done.

Example: vitexplain evaluate images/ --methods rollout,grad-attention,legrad --metrics deletion,insertion""")


def evaluate_command(methods: dict[str, type[Explainer]]) -> Callable[..., None]:
    """``evaluate``: the common model and run options, the metric settings, and every method parameter as a
    flag applying to the listed methods that declare it."""
    params: dict[str, Param] = {}
    for m in methods.values():
        for p in m.params:
            params.setdefault(p.name, p)

    def command(**options) -> None:
        shared = {n: value(options.pop(n)) for n in params if options.get(n) is not None}
        for n in params:
            options.pop(n, None)
        run_evaluation(options, shared)

    def flag(name: str, kind, default, help_text: str, **extra) -> inspect.Parameter:
        return option(name, Annotated[kind, typer.Option(f"--{name.replace('_', '-')}", help=help_text,
                                                         rich_help_panel=EVALUATE_PANEL, **extra)], default)

    def shared_option(param: Param) -> inspect.Parameter:
        users = [m.name for m in methods.values() if any(p.name == param.name for p in m.params)]
        return param_option(param, help_text=f"{param.help} For {', '.join(users)} (each method's own default).")

    parameters = [inspect.Parameter("inputs", inspect.Parameter.KEYWORD_ONLY, annotation=Inputs),
                  flag("methods", str, ",".join(methods), escape("Methods to evaluate, comma-separated; one method's "
                       "settings in brackets: 'rollout[fusion=max,discard-ratio=0.95],legrad'. Default: every method.")),
                  flag("metrics", str, "deletion,insertion,grid", "Metrics, comma-separated: deletion, insertion, grid, positive, negative (Chefer et al.'s perturbation AUC); with --boxes/--masks: pointing, energy, segmentation."),
                  flag("boxes", Optional[Path], None, "Ground-truth boxes: a folder of Pascal VOC .xml files named after the images (ImageNet's validation boxes), or one COCO-style .json. Labels: class index, name or ImageNet synset id. Adds the pointing and energy metrics.", show_default=False),
                  flag("masks", Optional[Path], None, "Ground-truth object masks: a folder of {stem}.png, non-zero = object. Adds pointing, energy and segmentation (pixel accuracy, mIoU, AP).", show_default=False),
                  flag("steps", int, 20, "Deletion/insertion steps S: step k perturbs ⌊k·P/S⌋ of the P patches.", min=1),
                  flag("baseline", BaselineChoice, BaselineChoice.mean, "What perturbed patches become: mean (0 in the "
                       "normalised input: the mean colour) or blur (Gaussian, σ 5 px, 11×11 kernel)."),
                  flag("seed", int, 0, "Seed of the random baseline maps."),
                  option("classes", Annotated[Optional[list[str]], typer.Option(
                      "--class", "-c", help="Target class for deletion/insertion (index or name; repeat for several). "
                      "Default: each image's top-1. The grid game explains each tile's own class.",
                      rich_help_panel=EVALUATE_PANEL)], None)]
    parameters += [shared_option(p) for p in params.values()]
    parameters += [option("out", Annotated[Path, typer.Option("--out", "-o", help="Folder for evaluation.jsonl, "
                          "summary.json/.csv and curves.png.", rich_help_panel=OUTPUT_PANEL)], Path("vitexplain-eval"))]
    parameters += [option(*spec) for spec in COMMON if spec[0] in EVALUATE_COMMON]
    parameters.append(option("save_raw", Annotated[bool, typer.Option("--save-raw", help="Also save each evaluated "
                             "mask as float32 .npy (its path in evaluation.jsonl).", rich_help_panel=OUTPUT_PANEL)], False))
    command.__signature__ = inspect.Signature(parameters)
    command.__name__ = "evaluate"
    return command


def build_app() -> typer.Typer:
    """The command line, with one subcommand per registered method, and ``sweep``."""
    app = typer.Typer(
        help="Explain what a Vision Transformer looks at: heatmaps for folders of images.\n\n"
        "Example: vitexplain rollout images/ --fusion max --discard-ratio 0.9",
        epilog=EXIT_CODES_HELP, no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    )

    @app.callback(invoke_without_command=True)
    def root(context: typer.Context,
             version: Annotated[bool, typer.Option("--version", is_eager=True, help="Print the version and exit.")] = False):
        if version:
            typer.echo(f"vitexplain {__version__}")
            raise typer.Exit()
        if context.invoked_subcommand is None:
            typer.echo(context.get_help())
            raise typer.Exit(2)

    methods = available_methods()
    for method in methods.values():
        help_text = f"{method.summary}\n\n{method.description}" if method.description else method.summary
        app.command(method.name, help=help_text, epilog=EXIT_CODES_HELP)(method_command(method))
    app.command("sweep", help=SWEEP_HELP, epilog=EXIT_CODES_HELP)(sweep_command(methods))
    app.command("evaluate", help=EVALUATE_HELP, epilog=EXIT_CODES_HELP)(evaluate_command(methods))
    app.command("compact", help=COMPACT_HELP)(compact)
    return app


COMPACT_HELP = """Fold the manifest parts of a sharded or Ray run (manifest.{part}.jsonl) into one manifest.jsonl.

Every line is kept as it is. Refused while a run writes to the folder. Example: vitexplain compact vitexplain-out"""


def compact(out: Annotated[Path, typer.Argument(help="The output folder of the run.", show_default=False)],
            manifest: Annotated[ManifestChoice, typer.Option("--manifest", help="Which manifest: the explanations', or evaluate's.")] = "manifest.jsonl") -> None:
    from .io.outputs import OutputError, compact_manifest

    if not out.is_dir():
        raise fail(f"{out} is not a folder", code=2)
    try:
        folded = compact_manifest(out, value(manifest))
    except (OutputError, ValueError) as error:
        raise fail(str(error), code=2) from None
    console.print(f"[green]done:[/] {plural(folded, 'part')} folded into {literal(out / value(manifest))}", highlight=False)


def run_command(method: str, options: dict, params: dict, sweep: SweepOptions | None) -> RunSummary:
    """Check the request, skip what is done, load the model, stream the images, print a summary."""
    from .io.outputs import OutputError
    from .models import ModelChoiceError
    from .run import job

    try:
        try:
            render = RenderOptions(value(options["colormap"]), options["alpha"], options["save_raw"],
                                   max_side=options["max_side"], image_format=value(options["image_format"]))
            engine = value(options["engine"])
            shard = job.parse_shard(options["shard"]) if options["shard"] is not None else None
            check_engine_options(options, engine, shard)
            ready = job.prepare(method, options["inputs"], options["out"], options["model"], options["checkpoint"],
                                options.get("classes"), render, sweep, options["stretch"], options["amp"],
                                value(options["device"]), options["overwrite"], param_label=lambda p: p.flag,
                                batch_size=options["batch_size"], shard=shard,
                                part="ray-driver" if engine == "ray" else None, labels=options["labels"], **params)
        except (ValueError, TypeError, ModelChoiceError, OutputError) as error:
            raise fail(str(error), code=2) from None
        print_header(ready.request.describe(), ready.writer.warnings, ready.input_failures)
        summary = explain_with_progress(ready, options)
    except KeyboardInterrupt:  # Ctrl-C before the images stream (loading torch, the weights): nothing to finish
        console.print("[bold yellow]interrupted[/] before any image was explained; nothing was written.")
        raise typer.Exit(130) from None
    failed = len(ready.input_failures) + len(summary.failures)
    print_summary(summary, failed, ready)
    if summary.interrupted:
        raise typer.Exit(130)
    if failed or summary.stopped:
        raise typer.Exit(1)
    return summary


def run_evaluation(options: dict, shared: dict) -> None:
    """Check the evaluation, evaluate what is left under progress bars, print the table, write the summary."""
    from .io.outputs import OutputError
    from .models import ModelChoiceError, ModelLoadError
    from .run import evaluation as ev
    from .run.evaluation_summary import summarize, write_summary

    try:
        try:
            metrics = [m.strip() for m in options["metrics"].split(",") if m.strip()]
            ready = ev.prepare_evaluation(
                options["inputs"], options["out"], ev.parse_methods(options["methods"]), metrics, options["steps"],
                value(options["baseline"]), options["model"], options["checkpoint"], options.get("classes"),
                options["amp"], value(options["device"]), options["overwrite"], options["seed"], options["save_raw"],
                shared, param_label=lambda p: p.flag, boxes=options["boxes"], masks=options["masks"],
                labels=options["labels"])
        except (ValueError, TypeError, ModelChoiceError, OutputError) as error:
            raise fail(str(error), code=2) from None
        print_header(ready.evaluation.describe(), ready.writer.warnings, ready.input_failures)
        try:
            with sigterm_stops(), progress_bar() as progress:
                images = progress.add_task("images", total=len(ready.todo), visible=bool(ready.todo))
                grids = progress.add_task("grids", total=None, visible=False)
                summary = ev.execute_evaluation(
                    ready, options["batch_size"], options["num_workers"],
                    on_notice=lambda text: console.print(f"[yellow]note:[/] {literal(text)}", highlight=False),
                    on_images=lambda n: progress.advance(images, n), on_failure=report_failure,
                    on_grids=lambda done, total: progress.update(grids, completed=done, total=total, visible=total > 0),
                    on_stop_request=lambda: console.print("stopping after this batch (Ctrl-C again to stop now)"))
        except ModelLoadError as error:
            raise fail(str(error), code=2) from None
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/] before any image was evaluated; nothing was written.")
        raise typer.Exit(130) from None
    rows = summarize(ready)
    for note in summary.notes:
        console.print(f"[yellow]annotation:[/] {literal(note)}", highlight=False, soft_wrap=True)
    if summary.notes:
        console.print(f"{plural(len(summary.notes), 'annotation problem')}: those maps are counted apart (no "
                      "ground-truth score)", highlight=False)
    print_evaluation(rows, ready.evaluation.metrics)
    try:
        written = write_summary(ready, rows)
    except OSError as error:
        summary.stopped = summary.stopped or f"cannot write the summary into {ready.writer.out_dir}: {error.strerror or error}"
        written = [ready.writer.manifest_path]
    failed = len(ready.input_failures) + len(summary.failures)
    parts = [f"{plural(summary.images - len(summary.failures), 'image')} evaluated now"]
    if ready.skipped:
        parts.append(f"{ready.skipped} already complete, skipped (--overwrite to redo them)")
    if failed:
        parts.append(f"[bold yellow]{failed} failed[/] (listed in evaluation.jsonl)")
    head = "[bold yellow]interrupted:[/]" if summary.interrupted else "[bold red]stopped:[/]" if summary.stopped \
        else "[green]done:[/]"
    if summary.stopped:
        console.print(f"[bold red]stopped:[/] {literal(summary.stopped)}", highlight=False, soft_wrap=True)
    console.print(f"{head} {'; '.join(parts)}; {', '.join(literal(p) for p in written)}", highlight=False)
    if summary.interrupted:
        raise typer.Exit(130)
    if failed or summary.stopped:
        raise typer.Exit(1)


def print_evaluation(rows, metrics: tuple[str, ...]) -> None:
    """The method × metric table: mean (95% bootstrap interval) and the count: images / grid tiles."""
    from rich.table import Table

    from .run.evaluation_summary import HEADINGS, MetricSummary, columns, table_rows

    no_grids = "grid" in metrics and not any(isinstance(row.metrics.get("grid"), MetricSummary) for row in rows)
    caption = ("grid pointing game –: no four inputs with different predicted classes to tile (it needs at least "
               "four classes among the predictions)") if no_grids else None
    table = Table(title="faithfulness: mean (95% bootstrap interval)", title_justify="left", caption=caption,
                  caption_justify="left")
    table.add_column("method", no_wrap=True)
    for metric in columns(metrics):
        table.add_column(HEADINGS[metric], justify="right")
    table.add_column("n", justify="right")
    for label, *cells in table_rows(rows, metrics, lambda s: f"{s.mean:.3f} [dim]({s.low:.2f}–{s.high:.2f})[/]"):
        table.add_row(literal(label), *cells)
    console.print(table)


def check_engine_options(options: dict, engine: str, shard) -> None:
    """The scale-out options fit together; ``ValueError`` saying what does not."""
    if engine == "ray":
        if shard is not None:
            raise ValueError("--shard is for processes started by a launcher; with --engine ray, Ray shares the work")
        if options["profile"]:
            raise ValueError("--profile times one process: it does not apply to --engine ray")
        from .run.ray_engine import import_ray

        import_ray()
        return
    given = [flag for name, flag, default in (("ray_address", "--ray-address", None), ("ray_workers", "--ray-workers", 1),
                                              ("cpus_per_worker", "--cpus-per-worker", 1.0),
                                              ("gpus_per_worker", "--gpus-per-worker", 0.0),
                                              ("ray_logs", "--ray-logs", False)) if options[name] != default]
    if given:
        raise ValueError(f"{given[0]} applies to --engine ray")


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Within the context, what is written to file descriptor 2 — Ray's C++ core, the processes it starts,
    Python warnings — is appended to ``path``; this console keeps the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = None
    try:
        if sys.stderr.fileno() == 2:  # the console writes to the real stderr: give it the terminal's copy
            terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests): it is not descriptor 2
        pass
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(log, 2)
    os.close(log)
    if terminal is not None:
        console.file = terminal
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if terminal is not None:
            console.file = None  # back to writing to whatever sys.stderr is
            terminal.close()


def explain_on_ray(ready: Job, options: dict) -> RunSummary:
    """The run on Ray actors under a progress bar."""
    from .run.ray_engine import run_on_ray

    logs = nullcontext() if options["ray_logs"] else stderr_to(ready.writer.out_dir / "ray.log")
    with logs, progress_bar() as progress:
        label = ready.request.method + (" sweep" if ready.request.sweep else "") + " on Ray"
        task = progress.add_task(label, total=len(ready.todo))
        return run_on_ray(ready, options["ray_workers"], options["cpus_per_worker"], options["gpus_per_worker"],
                          options["ray_address"], on_images=lambda n: progress.advance(task, n),
                          on_failure=report_failure)


def explain_with_progress(ready: Job, options: dict) -> RunSummary:
    """Load the weights, then explain what is left under a progress bar; SIGTERM stops it like Ctrl-C."""
    from .capture.support import UnsupportedModelError
    from .models import ModelLoadError
    from .run import job
    from .run.pipeline import RunSummary
    from .run.allocator import keep_heap_memory
    from .run.profiling import StageTimer

    if value(options["engine"]) == "ray":
        return explain_on_ray(ready, options)
    if not ready.todo:
        job.execute(ready)  # records the unusable inputs
        return RunSummary()
    keep_heap_memory()  # process-wide, so the command line's to set: see vitexplain.run.allocator
    timer = StageTimer(ready.device) if options["profile"] else None
    try:
        with sigterm_stops(), progress_bar() as progress:
            label = ready.request.method + (" sweep" if ready.request.sweep else "")
            task = progress.add_task(label, total=len(ready.todo))
            within = progress.add_task("  per image", total=None, visible=False)
            return job.execute(
                ready, options["batch_size"], options["num_workers"], on_notice=lambda text: console.print(
                    f"[yellow]note:[/] {literal(text)}", highlight=False, soft_wrap=True),
                warming=lambda: retitled(progress, task, label, "compiling kernels (first run only)…"),
                on_images=lambda n: progress.advance(task, n), on_failure=report_failure, timer=timer,
                on_progress=lambda done, total: progress.update(within, completed=done, total=total, visible=True),
                on_stop_request=lambda: console.print("stopping after this batch (Ctrl-C again to stop now)"),
            )
    except ModelLoadError as error:
        raise fail(str(error), code=2) from None
    except UnsupportedModelError as error:
        raise fail(str(error), code=2) from None
    finally:
        if timer is not None:
            print_profile(timer, len(ready.todo))


def print_header(description: str, warnings: list[str], failures: list[Failure]) -> None:
    """What the run computes, on one line; then what the manifest reader skipped and the unusable inputs."""
    console.print(f"[bold]{literal(description)}[/]", highlight=False, soft_wrap=True)
    for text in warnings:
        warn(text)
    for failure in failures:
        report_failure(failure)


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within the context SIGTERM stops the run as Ctrl-C does."""
    previous_handler = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


@contextmanager
def retitled(progress, task, title: str, while_: str) -> Iterator[None]:
    """The progress bar's task titled ``while_`` within the context, ``title`` again afterwards."""
    progress.update(task, description=while_)
    try:
        yield
    finally:
        progress.update(task, description=title)


def print_profile(timer: StageTimer, images: int) -> None:
    from rich.table import Table

    from .run.profiling import STAGE_HELP, STAGES

    table = Table(title="where the time went", title_justify="left")
    for column in ("stage", "seconds", "ms / image", "what"):
        table.add_column(column, justify="right" if column in ("seconds", "ms / image") else "left")
    for stage in STAGES:
        seconds = timer.seconds.get(stage, 0.0)
        table.add_row(stage, f"{seconds:.2f}", f"{1000 * seconds / max(1, images):.1f}", STAGE_HELP[stage])
    console.print(table)


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def print_summary(summary: RunSummary, failed: int, ready: Job) -> None:
    explained = summary.images - len(summary.failures)
    writer = ready.writer
    parts = [f"{plural(explained, 'image')} → {plural(summary.outputs, 'output')} in {literal(writer.out_dir)}/"]
    if summary.seconds and explained:
        parts.append(f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s on {ready.device}")
    if ready.skipped:
        parts.append(f"{ready.skipped} already complete, skipped (--overwrite to redo them)")
    if failed:
        parts.append(f"[bold yellow]{failed} failed[/] (listed in the manifest)")
    if summary.stopped:
        console.print(f"[bold red]stopped:[/] {literal(summary.stopped)}", highlight=False, soft_wrap=True)
    head = "[bold yellow]interrupted:[/]" if summary.interrupted else "[bold red]stopped:[/]" if summary.stopped \
        else "[green]done:[/]"
    others = [f for f in writer.manifest_files() if f != writer.manifest_path and f.is_file()]
    folded = f" (+{plural(len(others), 'part')}: vitexplain compact {literal(writer.out_dir)} folds them)" if others else ""
    console.print(f"{head} {'; '.join(parts)}; manifest: {literal(writer.manifest_path)}{folded}", highlight=False)
    if summary.interrupted or summary.stopped:
        console.print("Everything written so far is complete and in the manifest: run the same command again to finish.")


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


app = build_app()


def main() -> None:
    """The console script: process settings first (before torch loads), then the command line."""
    from .run.runtime import configure_process

    configure_process()
    app()


if __name__ == "__main__":
    main()
