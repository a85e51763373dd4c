"""``vitexplain`` command line: a thin shell over :func:`vitexplain.pipeline.explain_paths`."""

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .data import InputError, find_images
from .explainers import EXPLAINERS
from .methods.flow import SOLVERS
from .models import (DEFAULT_MODEL, ModelLoadError, class_names_for, class_synonyms_for, load_model,
                     preprocessing_for, resolve_class)
from .pipeline import RenderOptions, RunSummary, explain_paths, resolve_device
from .render import COLORMAPS
from .writer import OutputWriter

app = typer.Typer(
    help="Explain what a Vision Transformer looks at: heatmaps for folders of images.\n\n"
    "Example: vitexplain rollout images/ --fusion max --discard-ratio 0.9",
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
WorkersOpt = Annotated[int, typer.Option("--num-workers", "-j", min=0, help="DataLoader worker processes decoding images.")]
ColormapOpt = Annotated[ColormapChoice, typer.Option("--colormap", help="Heatmap colours.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity over the image.")]
SaveRawOpt = Annotated[bool, typer.Option("--save-raw", help="Also save each patch-grid mask as float32 .npy.")]
StretchOpt = Annotated[
    bool, typer.Option("--stretch/--no-stretch", help="Spread the colours over each mask's own min..max (overlays only; raw masks keep max 1)."),
]
SolverOpt = Annotated[SolverChoice, typer.Option("--solver", help="Max-flow solver: dinic (exact, fast) or networkx (reference, slow).")]
ClassOpt = Annotated[
    Optional[list[str]],
    typer.Option("--class", "-c", help="Target class: ImageNet index or name ('243', 'tiger cat'); repeat for several. Default: each image's top-1."),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def run_method(method: str, inputs: list[Path], out: Path, model: str, checkpoint: Path | None, fusion: str,
               discard_ratio: float, batch_size: int, device: str, num_workers: int, colormap: str,
               alpha: float, save_raw: bool, stretch: bool, classes: list[str] | None = None,
               **method_options) -> RunSummary:
    """Validate options, load the model, stream the images, print a summary."""
    try:
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")
        paths = find_images(inputs)
        torch_device = resolve_device(device)
        network = load_model(model, checkpoint=checkpoint).to(torch_device)
        names = class_names_for(network.num_classes)
        if EXPLAINERS[method].class_specific and not names:
            raise ValueError(f"{method} needs a classifier head, and {model!r} has none (num_classes=0)")
        targets = [resolve_class(c, class_synonyms_for(network.num_classes)) for c in classes] if classes else None
    except (InputError, ValueError) as error:
        raise fail(str(error), code=2) from None
    except ModelLoadError as error:
        raise fail(str(error)) from None
    if not paths:
        raise fail("no images found in the given inputs", code=2)
    explainer = EXPLAINERS[method](network, fusion=fusion, discard_ratio=discard_ratio, **method_options)
    with progress_bar() as progress:
        task = progress.add_task(f"{method}", total=len(paths))
        within = progress.add_task("  per image", total=None, visible=False)
        explainer.on_progress = lambda done, total: progress.update(within, completed=done, total=total, visible=True)
        summary = explain_paths(
            explainer, paths, preprocessing_for(network), OutputWriter(out, paths), names, targets,
            RenderOptions(colormap, alpha, save_raw, stretch), batch_size, num_workers, torch_device,
            on_images=lambda n: progress.advance(task, n),
        )
    console.print(
        f"[green]done:[/] {summary.images} images → {summary.outputs} outputs in {out}/ "
        f"({summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s on {torch_device}); "
        f"manifest: {out / 'manifest.jsonl'}",
        highlight=False,
    )
    return summary


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def explain_command(method: str) -> Callable[..., None]:
    """A subcommand running ``method``; options a method does not take are left out of its signature."""

    def command(
        inputs: Inputs,
        classes: ClassOpt = None,
        out: OutDir = Path("vitexplain-out"),
        model: ModelName = DEFAULT_MODEL,
        checkpoint: CheckpointPath = None,
        fusion: FusionOpt = FusionChoice.mean,
        discard_ratio: DiscardOpt = 0.9,
        batch_size: BatchOpt = 8,
        device: DeviceOpt = DeviceChoice.auto,
        num_workers: WorkersOpt = 0,
        colormap: ColormapOpt = ColormapChoice.jet,
        alpha: AlphaOpt = 0.5,
        save_raw: SaveRawOpt = False,
        stretch: StretchOpt = EXPLAINERS[method].stretch_overlay,
        solver: SolverOpt = SolverChoice.dinic,
    ) -> None:
        options = {"solver": solver.value} if "solver" in EXPLAINERS[method].options else {}
        run_method(method, inputs, out, model, checkpoint, fusion.value, discard_ratio, batch_size,
                   device.value, num_workers, colormap.value, alpha, save_raw, stretch, classes, **options)

    signature = inspect.signature(command)
    unused = {"classes", "solver"} - set(EXPLAINERS[method].options)
    command.__signature__ = signature.replace(parameters=[p for n, p in signature.parameters.items() if n not in unused])
    command.__name__ = method.replace("-", "_")
    return command


ROLLOUT_HELP = """Attention Rollout (Abnar & Zuidema 2020): class-agnostic map of what the prediction draws on.

Per layer: fuse heads (--fusion), zero the lowest --discard-ratio of entries, add the identity (residual) and normalise rows; multiply the layers and read the CLS row over the patches.
"""
GRAD_ROLLOUT_HELP = """Gradient Attention Rollout: where the evidence for one class is.

Per layer and head relu(A ⊙ ∂y_c/∂A), with y_c the target logit; then fused and rolled out as in rollout. One output per image and --class.
"""
app.command("rollout", help=ROLLOUT_HELP)(explain_command("rollout"))
app.command("grad-rollout", help=GRAD_ROLLOUT_HELP)(explain_command("grad-rollout"))
FLOW_HELP = """Attention Flow (Abnar & Zuidema 2020): max-flow from the CLS token down the layer graph to each patch.

Edges between consecutive layers carry the same residual, row-normalised fused attention that rollout multiplies; a patch's value is the maximum flow that reaches it. Exact (--solver dinic, compiled; or the networkx reference).
"""
app.command("flow", help=FLOW_HELP)(explain_command("flow"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
