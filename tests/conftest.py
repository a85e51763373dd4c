"""Shared fixtures. Real weights and photos come from ../shared (never copied into the repo)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ["COLUMNS"] = "250"  # rich and typer wrap messages at the terminal width; tests read them whole

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEIT_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.pth"
BOTH_IMAGE = SHARED / "images" / "both.png"

needs_shared = pytest.mark.skipif(not DEIT_WEIGHTS.is_file(), reason=f"real weights not found at {DEIT_WEIGHTS}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_attention(batch: int, heads: int, tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row-stochastic random attention ``(B, H, N, N)``."""
    logits = torch.randn(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64) * 2
    return logits.softmax(dim=-1)


@pytest.fixture
def save_test_vit(tmp_path):
    """Save a random-init ``test_vit`` (optionally with other kwargs) as a checkpoint; returns (model, path)."""
    import timm

    def save(num_classes: int = 5, **kwargs):
        model = timm.create_model("test_vit", pretrained=False, num_classes=num_classes, **kwargs).eval()
        path = tmp_path / "test_vit.pth"
        torch.save(model.state_dict(), path)
        return model, path

    return save


def write_image(path: Path, size: tuple[int, int] = (48, 64), seed: int = 0) -> np.ndarray:
    """A random RGB picture of ``size`` (H, W) written to ``path``; returns its pixels."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def build_offline_hf_cache(home: Path, names=("deit_tiny_patch16_224",)) -> Path:
    """A Hugging Face cache under ``home`` holding timm's default pretrained weights for ``names``, made from
    the real weights in ``../shared/weights`` (timm's loader reads it with ``HF_HOME=home``, ``HF_HUB_OFFLINE=1``)."""
    import timm
    from safetensors.torch import save_file

    commit = "0" * 40
    for name in names:
        tag = timm.models.get_pretrained_cfg(name).tag
        repo = home / "hub" / f"models--timm--{name}.{tag}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        state = torch.load(SHARED / "weights" / f"{name}.pth", map_location="cpu", weights_only=True)
        save_file({key: value.contiguous() for key, value in state.items()}, str(snapshot / "model.safetensors"))
    return home


def invoke(*args, app=None):
    """Run the command line in-process (``app``: another build of it), arguments as strings; exceptions raise."""
    from typer.testing import CliRunner

    if app is None:
        from vitexplain.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def said(result) -> str:
    """What a command printed, on one line (rich wraps at the terminal width)."""
    return " ".join(result.output.split())


def read_manifest(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
