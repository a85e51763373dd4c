"""GPU throughput, ready to run unattended on a CUDA machine: one table, well under 8 minutes.

For deit_tiny_patch16_224 and vit_base_patch16_224 (random init: the same cost as trained weights), with and
without --amp, on --images synthetic inputs already on the device (what the model and the methods cost, not
decoding or writing):

    inference      bare timm inference (fused attention, inference mode)
    rollout        `rollout` (mean, discard 0.9): capture + the method, on the device
    fwd+bwd        forward + backward to the input (∂ top-1 logit / ∂ input), no weight gradients
    grad-rollout, grad-attention, chefer, legrad, lrp: each class-specific method, top-1 target

Each cell is images/s (median of --rounds timed passes after a warm-up pass, synchronised), and the ratios
rollout/inference and method/fwd+bwd. `--device cpu --images 16 --rounds 1` checks the script anywhere.

    python benchmarks/gpu.py [--images 512] [--batch-size 64] [--rounds 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from vitexplain import get_method, load_model

MODELS = ("deit_tiny_patch16_224", "vit_base_patch16_224")
CLASS_SPECIFIC = ("grad-rollout", "grad-attention", "chefer", "legrad", "lrp")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(run, images: int, rounds: int, device: torch.device) -> float:
    run()  # warm-up: kernels chosen, memory pools grown
    synchronize(device)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return images / statistics.median(seconds)


def measure(name: str, amp: bool, args, device: torch.device) -> dict[str, float]:
    model = load_model(name, pretrained=False).to(device)
    dtype = (torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16) if amp else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if amp else nullcontext
    pixels = torch.randn(args.images, 3, 224, 224, device=device, generator=torch.Generator(device).manual_seed(0))
    chunks = list(pixels.split(args.batch_size))

    def inference():
        with torch.inference_mode(), autocast():
            for chunk in chunks:
                model(chunk)

    def forward_backward():
        for chunk in chunks:
            chunk = chunk.clone().requires_grad_()
            with autocast():
                logits = model(chunk)
            logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum().backward(inputs=[chunk])

    def method(method_name: str):
        explainer = get_method(method_name)(model, amp=dtype)

        def run():
            for chunk in chunks:
                explainer(chunk)
        return run

    figures = {"inference": rate(inference, args.images, args.rounds, device),
               "rollout": rate(method("rollout"), args.images, args.rounds, device),
               "fwd+bwd": rate(forward_backward, args.images, args.rounds, device)}
    for method_name in CLASS_SPECIFIC:
        figures[method_name] = rate(method(method_name), args.images, args.rounds, device)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu to check the script")
    started = time.perf_counter()
    columns = ("inference", "rollout", "fwd+bwd", *CLASS_SPECIFIC)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {args.images} synthetic images per cell, batch {args.batch_size}; "
          "images/s (ratio: rollout / inference, methods / fwd+bwd)")
    print(f"| model | amp | {' | '.join(columns)} |")
    print("|---|---|" + "---:|" * len(columns))
    for name in args.models:
        for amp in (False, True):
            f = measure(name, amp, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model and inputs of the cell just measured are gone
            cells = [f"{f['inference']:.0f}", f"{f['rollout']:.0f} ({f['rollout'] / f['inference']:.2f})", f"{f['fwd+bwd']:.0f}"]
            cells += [f"{f[m]:.0f} ({f[m] / f['fwd+bwd']:.2f})" for m in CLASS_SPECIFIC]
            print(f"| {name} | {'on' if amp else 'off'} | {' | '.join(cells)} |", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
