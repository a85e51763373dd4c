"""``vitexplain`` command line: a thin shell over :func:`vitexplain.pipeline.explain_paths`."""

from .openmp import shorten_spin_wait

shorten_spin_wait()  # before torch loads libgomp: see vitexplain.openmp

import inspect
import os
import signal
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .allocator import keep_heap_memory
from .data import Failure, find_images
from .explainers import EXPLAINERS
from .methods.flow import SOLVERS
from .models import (DEFAULT_MODEL, ModelChoiceError, ModelLoadError, ModelPlan, build_model, class_names_for,
                     class_synonyms_for, plan_model, preprocessing_for, resolve_class)
from .profiling import STAGE_HELP, STAGES, StageTimer
from .pipeline import (Request, RenderOptions, RunSummary, SweepOptions, explain_paths, remaining_paths,
                       resolve_device, writer_threads)
from .sweep import RATIOS_HELP, parse_ratios
from .render import COLORMAPS
from .writer import IMAGE_FORMATS, OutputError, OutputWriter

EXIT_CODES_HELP = "Exit codes: 0 all inputs explained; 1 some inputs failed (see manifest.jsonl); 2 usage error; 130 interrupted."
app = typer.Typer(
    help="Explain what a Vision Transformer looks at: heatmaps for folders of images.\n\n"
    "Example: vitexplain rollout images/ --fusion max --discard-ratio 0.9",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)

FusionChoice = Enum("FusionChoice", {name: name for name in ("mean", "max", "min")}, type=str)
DeviceChoice = Enum("DeviceChoice", {name: name for name in ("auto", "cpu", "cuda", "mps")}, type=str)
SolverChoice = Enum("SolverChoice", {name: name for name in SOLVERS}, type=str)
ColormapChoice = Enum("ColormapChoice", {name: name for name in COLORMAPS}, type=str)

Inputs = Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).", show_default=False)]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays, raw masks and manifest.jsonl.")]
ModelName = Annotated[str, typer.Option("--model", "-m", help="timm ViT name; pretrained weights via timm unless --checkpoint.")]
CheckpointPath = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="Local state dict (.pth/.pt/.safetensors; plain or under 'state_dict'/'model') for --model."),
]
FusionOpt = Annotated[FusionChoice, typer.Option("--fusion", help="How to fuse attention heads per layer.")]
DiscardOpt = Annotated[
    float, typer.Option("--discard-ratio", help="Fraction of each layer's lowest fused attention zeroed, in [0, 1).")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="auto = CUDA, then MPS, then CPU.")]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--num-workers", "-j", min=0, help="DataLoader worker processes decoding images. Default: on CPU half the cores, at most 4; with a GPU, the cores not needed for writing, at most 12.", show_default=False),
]
ColormapOpt = Annotated[ColormapChoice, typer.Option("--colormap", help="Heatmap colours.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity over the image.")]
SaveRawOpt = Annotated[bool, typer.Option("--save-raw", help="Also save each patch-grid mask as float32 .npy.")]
StretchOpt = Annotated[
    Optional[bool],
    typer.Option("--stretch/--no-stretch", help="Spread the colours over each mask's own min..max (overlays only; raw masks keep max 1). Default: on for flow.", show_default=False),
]
SolverOpt = Annotated[SolverChoice, typer.Option("--solver", help="Max-flow solver: dinic (exact, fast) or networkx (reference, slow).")]
ClassOpt = Annotated[
    Optional[list[str]],
    typer.Option("--class", "-c", help="Target class: ImageNet index or name ('243', 'tiger cat'); repeat for several. Default: each image's top-1."),
]


MethodChoice = Enum("MethodChoice", {name: name for name in EXPLAINERS}, type=str)
MethodOpt = Annotated[MethodChoice, typer.Option("--method", help="Which explanation to sweep.")]
RatiosOpt = Annotated[str, typer.Option("--ratios", help=f"Discard ratios: {RATIOS_HELP}.")]
FpsOpt = Annotated[float, typer.Option("--fps", min=0.1, max=50.0, help="GIF frames per second.")]
GifOpt = Annotated[bool, typer.Option("--gif/--no-gif", help="Write an animated, looping GIF per image.")]
MaxSideOpt = Annotated[
    Optional[int],
    typer.Option("--max-side", min=16, help="Downscale written pictures to this longer side in pixels. Default: the image's own size (sweep frames: 256).", show_default=False),
]
FormatChoice = Enum("FormatChoice", {name: name for name in IMAGE_FORMATS}, type=str)
FormatOpt = Annotated[FormatChoice, typer.Option("--format", help="Overlay file format: png (lossless) or jpg (quality 90: ~2.7× faster to write, ~6× smaller).")]
ProfileOpt = Annotated[bool, typer.Option("--profile", help="Report where the time went: decode, model, method, write.")]
AmpOpt = Annotated[bool, typer.Option("--amp", help="Forward pass in bfloat16/float16 autocast (GPU; bfloat16 on CPU); attention math stays float32.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Recompute outputs that a previous run of the same command completed (default: skip them)."),
]
GridOpt = Annotated[bool, typer.Option("--grid", help="Also write a contact sheet PNG of all frames.")]


@dataclass
class CommandLine:
    """Everything one command line asked for (options a command does not offer keep their defaults)."""

    method: str
    inputs: list[Path]
    out: Path
    model: str
    checkpoint: Path | None
    fusion: str
    discard_ratio: float
    batch_size: int
    device: str
    num_workers: int | None  # None: default_workers for the device
    render: RenderOptions
    stretch: bool | None
    classes: list[str] | None
    solver: str
    sweep: SweepOptions | None
    overwrite: bool = False
    profile: bool = False
    amp: bool = False


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@dataclass
class Prepared:
    """A command line checked before any weights are loaded."""

    plan: ModelPlan
    request: Request
    paths: list[Path]
    input_failures: list[Failure]
    class_names: tuple[str, ...]
    device: torch.device
    writer: OutputWriter


def prepare(line: CommandLine) -> Prepared:
    """Check every option (raising ``ValueError``, ``ModelChoiceError`` or ``OutputError``) and find the images."""
    if not 0.0 <= line.discard_ratio < 1.0:
        raise ValueError(f"--discard-ratio must be in [0, 1), got {line.discard_ratio}")
    explainer_class = EXPLAINERS[line.method]
    if line.classes and not explainer_class.class_specific:
        raise ValueError(f"--class applies to class-specific methods (grad-rollout), not {line.method}")
    device = resolve_device(line.device)
    paths, input_failures = find_images(line.inputs)
    writer = OutputWriter(line.out, paths)  # proves --out writable
    plan = plan_model(line.model, checkpoint=line.checkpoint)
    names = class_names_for(plan.num_classes)
    if explainer_class.class_specific and not names:
        raise ValueError(f"{line.method} needs a classifier head, and {line.model!r} has none (num_classes=0)")
    synonyms = class_synonyms_for(plan.num_classes)
    targets = tuple(resolve_class(c, synonyms) for c in line.classes) if line.classes else None
    request = Request(line.method, line.fusion, line.discard_ratio, targets, line.sweep)
    return Prepared(plan, request, paths, input_failures, names, device, writer)


def report_failure(failure: Failure) -> None:
    console.print(f"[yellow]failed:[/] {failure.path}: {failure.reason}", highlight=False, soft_wrap=True)


def run(line: CommandLine) -> RunSummary:
    """Check the options, skip what is done, load the model, stream the images, print a summary."""
    try:
        ready = prepare(line)
    except (ValueError, ModelChoiceError, OutputError) as error:
        raise fail(str(error), code=2) from None
    writer = ready.writer
    for failure in ready.input_failures:
        report_failure(failure)
        writer.record_failure(failure.path, failure.reason, ready.request.key)
    if line.overwrite:
        writer.forget(ready.request.key, ready.paths)
        todo = ready.paths
    else:
        todo = remaining_paths(ready.paths, writer, ready.request)
    summary = explain_with_progress(line, ready, writer, todo) if todo else RunSummary()
    failed = len(ready.input_failures) + len(summary.failures)
    print_summary(summary, failed, skipped=len(ready.paths) - len(todo), writer=writer, device=ready.device)
    if summary.interrupted:
        raise typer.Exit(130)
    if failed:
        raise typer.Exit(1)
    return summary


def explain_with_progress(line: CommandLine, ready: Prepared, writer: OutputWriter, todo: list[Path]) -> RunSummary:
    """Load the weights, then explain ``todo`` under a progress bar; SIGTERM stops it like Ctrl-C."""
    keep_heap_memory()
    try:
        network = build_model(ready.plan).to(ready.device)
    except ModelLoadError as error:
        raise fail(str(error)) from None
    explainer_class = EXPLAINERS[line.method]
    options = {"solver": line.solver} if "solver" in explainer_class.options else {}
    explainer = explainer_class(network, fusion=line.fusion, discard_ratio=line.discard_ratio,
                                amp=amp_dtype(ready.device) if line.amp else None, **options)
    stretch = explainer.stretch_overlay if line.stretch is None else line.stretch
    timer = StageTimer(ready.device) if line.profile else None
    previous_handler = signal.signal(signal.SIGTERM, interrupt)
    try:
        with progress_bar() as progress:
            task = progress.add_task(line.method + (" sweep" if line.sweep else ""), total=len(todo))
            within = progress.add_task("  per image", total=None, visible=False)
            explainer.on_progress = lambda done, total: progress.update(within, completed=done, total=total, visible=True)
            return explain_paths(
                explainer, todo, preprocessing_for(network), writer, ready.class_names, ready.request,
                replace(line.render, stretch=stretch), line.batch_size,
                default_workers(ready.device) if line.num_workers is None else line.num_workers, ready.device,
                on_images=lambda n: progress.advance(task, n), on_failure=report_failure, timer=timer,
                on_stop_request=lambda: console.print("stopping after this batch (Ctrl-C again to stop now)"),
            )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if timer is not None:
            print_profile(timer, todo)


def default_workers(device: torch.device = torch.device("cpu")) -> int:
    """On CPU half the cores (the model's threads need the rest), at most 4; with a GPU doing the model,
    the cores left after the main thread and the writer threads, at most 12."""
    cores = os.cpu_count() or 2
    if device.type == "cpu":
        return min(4, cores // 2)
    return max(1, min(12, cores - 1 - writer_threads()))


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where supported (CPU, recent GPUs), float16 otherwise."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.float16 if device.type == "mps" else torch.bfloat16


def print_profile(timer: StageTimer, todo: list[Path]) -> None:
    table = Table(title="where the time went", title_justify="left")
    for column in ("stage", "seconds", "ms / image", "what"):
        table.add_column(column, justify="right" if column in ("seconds", "ms / image") else "left")
    for stage in STAGES:
        seconds = timer.seconds.get(stage, 0.0)
        table.add_row(stage, f"{seconds:.2f}", f"{1000 * seconds / max(1, len(todo)):.1f}", STAGE_HELP[stage])
    console.print(table)


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def print_summary(summary: RunSummary, failed: int, skipped: int, writer: OutputWriter, device: torch.device) -> None:
    explained = summary.images - len(summary.failures)
    parts = [f"{explained} images → {summary.outputs} outputs in {writer.out_dir}/"]
    if summary.seconds and explained:
        parts.append(f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s on {device}")
    if skipped:
        parts.append(f"{skipped} already complete, skipped (--overwrite to redo them)")
    if failed:
        parts.append(f"[bold yellow]{failed} failed[/] (listed in the manifest)")
    head = "[bold yellow]interrupted:[/]" if summary.interrupted else "[green]done:[/]"
    console.print(f"{head} {'; '.join(parts)}; manifest: {writer.manifest_path}", highlight=False)
    if summary.interrupted:
        console.print("Everything written so far is complete and in the manifest: run the same command again to finish.")


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


COMMON = {"inputs", "out", "model", "checkpoint", "fusion", "batch_size", "device", "num_workers", "colormap",
          "alpha", "save_raw", "stretch", "max_side", "overwrite", "image_format", "profile", "amp"}
COMMAND_OPTIONS = {
    "rollout": COMMON | {"discard_ratio"},
    "grad-rollout": COMMON | {"discard_ratio", "classes"},
    "flow": COMMON | {"discard_ratio", "solver"},
    "sweep": COMMON | {"method", "ratios", "fps", "gif", "grid", "classes", "solver"},
}


def make_command(name: str) -> Callable[..., None]:
    """Subcommand ``name``: one template, with the options ``name`` does not offer left out of its signature."""

    def command(
        inputs: Inputs,
        method: MethodOpt = MethodChoice.rollout,
        classes: ClassOpt = None,
        ratios: RatiosOpt = "0:0.95:20",
        out: OutDir = Path("vitexplain-out"),
        model: ModelName = DEFAULT_MODEL,
        checkpoint: CheckpointPath = None,
        fusion: FusionOpt = FusionChoice.mean,
        discard_ratio: DiscardOpt = 0.9,
        batch_size: BatchOpt = 8,
        device: DeviceOpt = DeviceChoice.auto,
        num_workers: WorkersOpt = None,
        colormap: ColormapOpt = ColormapChoice.jet,
        alpha: AlphaOpt = 0.5,
        stretch: StretchOpt = None,
        save_raw: SaveRawOpt = False,
        max_side: MaxSideOpt = None,
        image_format: FormatOpt = FormatChoice.png,
        overwrite: OverwriteOpt = False,
        profile: ProfileOpt = False,
        amp: AmpOpt = False,
        solver: SolverOpt = SolverChoice.dinic,
        gif: GifOpt = True,
        grid: GridOpt = False,
        fps: FpsOpt = 4.0,
    ) -> None:
        sweep = None
        if name == "sweep":
            try:
                sweep = SweepOptions(parse_ratios(ratios), gif, grid, fps)
            except ValueError as error:
                raise fail(str(error), code=2) from None
            if not (gif or grid or save_raw):
                raise fail("nothing to write: give --gif, --grid or --save-raw", code=2)
        render = RenderOptions(colormap.value, alpha, save_raw, max_side=max_side, image_format=image_format.value)
        run(CommandLine(
            method.value if name == "sweep" else name, inputs, out, model, checkpoint, fusion.value, discard_ratio,
            batch_size, device.value, num_workers, render, stretch, classes,
            solver.value, sweep, overwrite, profile, amp,
        ))

    signature = inspect.signature(command)
    offered = [p for n, p in signature.parameters.items() if n in COMMAND_OPTIONS[name]]
    command.__signature__ = signature.replace(parameters=offered)
    command.__name__ = name.replace("-", "_")
    return command


HELP = {
    "rollout": """Attention Rollout (Abnar & Zuidema 2020): class-agnostic map of what the prediction draws on.

Per layer: fuse heads (--fusion), zero the lowest --discard-ratio of entries, add the identity (residual) and normalise rows; multiply the layers and read the CLS row over the patches.""",
    "grad-rollout": """Gradient Attention Rollout: where the evidence for one class is.

Per layer and head relu(A ⊙ ∂y_c/∂A), with y_c the target logit; then fused and rolled out as in rollout. One output per image and --class.""",
    "flow": """Attention Flow (Abnar & Zuidema 2020): max-flow from the CLS token down the layer graph to each patch.

Edges between consecutive layers carry the same residual, row-normalised fused attention that rollout multiplies; a patch's value is the maximum flow that reaches it. Exact (--solver dinic, compiled; or the networkx reference). Overlays are contrast-stretched by default.""",
    "sweep": """The same image over many discard ratios, as an animated GIF (and --grid contact sheet).

One forward pass (and one backward for grad-rollout) per image, however many ratios. Example: vitexplain sweep img.png --method rollout --fusion max --ratios 0:0.99:20 --grid""",
}
for command_name in COMMAND_OPTIONS:
    app.command(command_name, help=HELP[command_name], epilog=EXIT_CODES_HELP)(make_command(command_name))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
