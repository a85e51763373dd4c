"""Throughput features: JPEG overlays, autocast, the stage profile, memory release, worker defaults."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_image
from vitexplain import AttentionRollout, GradientRollout, load_model
from vitexplain.run import allocator, openmp
from vitexplain.cli import app
from vitexplain.run.runtime import default_workers
from vitexplain.run.runtime import writer_threads
from vitexplain.run.profiling import STAGES, StageTimer

runner = CliRunner()


def test_jpg_overlays_and_profile_table(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    for i in range(3):
        write_image(tmp_path / "in" / f"p{i}.png", (200, 280), seed=i)
    result = runner.invoke(app, ["rollout", str(tmp_path / "in"), "--model", "test_vit", "--checkpoint", str(checkpoint),
                                 "-o", str(tmp_path / "out"), "--format", "jpg", "--profile"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 3 and all(e["overlay"].endswith("_rollout_mean_d0.9.jpg") for e in entries)
    assert all(iio.imread(e["overlay"]).shape == (200, 280, 3) for e in entries)
    table = result.output[result.output.index("where the time went"):]
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.count("│") > 3}
    assert set(STAGES) <= set(rows)
    assert float(rows["model"].split("│")[3]) > 0 and float(rows["write"].split("│")[3]) > 0  # ms / image


def test_stage_timer_sums_per_stage():
    timer = StageTimer()
    with timer("model"):
        time.sleep(0.01)
    with timer("model"):
        time.sleep(0.01)
    timer.add("write", 0.5)
    assert 0.02 <= timer.seconds["model"] < 0.5 and timer.seconds["write"] == 0.5 and "method" not in timer.seconds


@pytest.mark.parametrize("explainer_class", [AttentionRollout, GradientRollout])
def test_autocast_keeps_the_attention_math_in_float32(explainer_class):
    torch.manual_seed(0)
    model = load_model("test_vit", pretrained=False)
    images = torch.randn(2, 3, 160, 160)
    exact = explainer_class(model, discard_ratio=0.0).explain(images)
    fast = explainer_class(model, discard_ratio=0.0, amp=torch.bfloat16).explain(images)
    assert fast.masks.dtype == torch.float32
    assert fast.logits.dtype == torch.bfloat16  # the forward pass did run in bfloat16
    assert (fast.masks - exact.masks).abs().max() < 0.05
    assert torch.corrcoef(torch.stack([fast.masks.flatten(), exact.masks.flatten()]))[0, 1] > 0.98


def test_default_workers_leave_cores_for_the_model(monkeypatch):
    cuda = torch.device("cuda")
    for cores, cpu_workers, gpu_workers, writers in ((1, 0, 1, 2), (2, 1, 1, 2), (8, 4, 5, 2), (16, 4, 11, 4), (64, 4, 12, 8)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert (default_workers(), default_workers(cuda), writer_threads()) == (cpu_workers, gpu_workers, writers)


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_heap_is_trimmed_every_sixteenth_batch_and_kept_in_between(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    assert allocator.keep_heap_memory()
    assert libc.calls == [("mallopt", allocator.M_MMAP_THRESHOLD, 256 << 20), ("mallopt", allocator.M_TRIM_THRESHOLD, 512 << 20)]
    libc.calls.clear()
    trim = allocator.PeriodicTrim()
    trims = []
    for batch in range(1, 49):
        trim()
        if libc.calls:
            trims.append(batch)
            libc.calls.clear()
    assert trims == [16, 32, 48]


def test_heap_is_trimmed_before_the_loader_forks_its_workers(monkeypatch, tmp_path, save_test_vit):
    """Forked workers share the parent's heap copy-on-write: its free pages go back to the OS first."""
    import vitexplain.run.pipeline as pipeline

    _, checkpoint = save_test_vit()
    write_image(tmp_path / "in" / "p.png", (40, 40), seed=0)
    libc, real_loader = FakeLibc(), pipeline.make_loader
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.setattr(pipeline, "make_loader", lambda *args: libc.calls.append("loader") or real_loader(*args))
    result = runner.invoke(app, ["rollout", str(tmp_path / "in"), "--model", "test_vit", "--checkpoint", str(checkpoint),
                                 "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [call for call in libc.calls if call[0] != "mallopt"] == [("malloc_trim", 0), "loader"]


def test_allocator_settings_do_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_heap_memory() is False
    allocator.PeriodicTrim(every=1)()  # no error, nothing to call


SPIN_PROBE = """
import os, sys

class NoteTorchImport:  # records GOMP_SPINCOUNT at the moment torch (and with it libgomp) is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "at_torch_import" not in globals():
            globals()["at_torch_import"] = os.environ.get("GOMP_SPINCOUNT")

sys.meta_path.insert(0, NoteTorchImport())
before = dict(os.environ)
import vitexplain, vitexplain.cli
assert "torch" not in sys.modules, "importing the package or its command line must not load torch"
assert dict(os.environ) == before, "importing must change nothing process-wide"
sys.argv = ["vitexplain", "rollout", "--help"]
try:
    vitexplain.cli.main()  # the entry point applies the process settings, then answers --help
except SystemExit as done:
    assert done.code == 0
assert "torch" not in sys.modules, "--help must not load torch"
import torch
print(at_torch_import)
"""


@pytest.mark.parametrize("env, expected", [({}, "20000"), ({"GOMP_SPINCOUNT": "7"}, "7"),
                                           ({"OMP_WAIT_POLICY": "PASSIVE"}, "None")])
def test_cli_shortens_openmp_spin_before_torch_loads_unless_the_user_chose(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", SPIN_PROBE], env={**base, **env}, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == expected


def test_spin_is_left_alone_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert openmp.shorten_spin_wait() is False  # torch is loaded in this process: too late to matter
    assert "GOMP_SPINCOUNT" not in os.environ


def test_a_compiled_kernel_leaves_torchs_thread_count_as_it_was():
    """numba's first parallel launch would set the thread's OpenMP count to numba's own (a fresh process)."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\n"
            "from vitexplain import load_model, get_method\n"
            "m = load_model('test_vit', pretrained=False)\n"
            "get_method('rollout')(m)(torch.randn(1, 3, 160, 160)); get_method('flow')(m)(torch.randn(1, 3, 160, 160))\n"
            "print(torch.get_num_threads())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"
