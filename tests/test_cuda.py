"""The CUDA path (run where CUDA is present, skipped elsewhere): every method's maps on the device equal the
CPU's, rollout never leaves the device, and a run on CUDA writes what a CPU run writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import invoke, write_image
from test_capture import images_for
from vitexplain import available_methods, get_method, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["rollout", "grad-rollout", "flow", "grad-attention", "chefer", "legrad"])
def test_maps_on_cuda_equal_the_cpus(name):
    assert name in available_methods()
    model = load_model("deit_tiny_patch16_224", pretrained=False)
    pixels = images_for(model, batch=3)
    on_cpu = get_method(name)(model)(pixels)
    on_cuda = get_method(name)(model.to(CUDA))(pixels.to(CUDA))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-3, atol=1e-4)


def test_rollout_on_cuda_stays_on_the_device(monkeypatch):
    import vitexplain.kernels.rollout as kernels

    def refuse(*args):
        raise AssertionError("the CPU kernel was called: the maps were copied to the host")

    monkeypatch.setattr(kernels, "rollout_rows", refuse)
    model = load_model("test_vit", pretrained=False).to(CUDA)
    masks = get_method("rollout")(model)(images_for(model).to(CUDA))
    assert masks.device.type == "cuda" and torch.isfinite(masks).all()


def test_amp_on_cuda_stays_close_to_float32():
    model = load_model("deit_tiny_patch16_224", pretrained=False).to(CUDA)
    pixels = images_for(model, batch=2).to(CUDA)
    exact = get_method("grad-rollout")(model)(pixels).flatten(1)
    mixed = get_method("grad-rollout")(model, amp=torch.bfloat16)(pixels).flatten(1)
    correlation = torch.nn.functional.cosine_similarity(exact - exact.mean(1, keepdim=True),
                                                        mixed - mixed.mean(1, keepdim=True))
    assert (correlation > 0.95).all()


def test_a_cuda_run_writes_what_a_cpu_run_writes(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    for i in range(3):
        write_image(tmp_path / "in" / f"img{i}.png", seed=i)
    for device in ("cpu", "cuda"):
        result = invoke("grad-rollout", tmp_path / "in", "--model", "test_vit", "--checkpoint", checkpoint,
                        "--device", device, "-o", tmp_path / device, "--save-raw")
        assert result.exit_code == 0, result.output
    entries = {device: sorted((json.loads(line) for line in (tmp_path / device / "manifest.jsonl").read_text().splitlines()),
                              key=lambda e: e["input"]) for device in ("cpu", "cuda")}
    assert [e["name"] for e in entries["cpu"]] == [e["name"] for e in entries["cuda"]]
    for on_cpu, on_cuda in zip(entries["cpu"], entries["cuda"]):
        np.testing.assert_allclose(np.load(on_cuda["raw"]), np.load(on_cpu["raw"]), rtol=1e-3, atol=1e-4)
