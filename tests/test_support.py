"""Models the capture cannot record faithfully are refused with one clear line, never explained wrongly."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import write_image
from vitexplain.capture.record import capture_attention
from vitexplain.capture.support import UnsupportedModelError
from vitexplain.cli import app
from vitexplain.models import ModelChoiceError, load_model, plan_model

runner = CliRunner()


@pytest.mark.parametrize("name, message", [
    ("cait_xxs24_224", "'cait_xxs24_224' is a Cait, not a plain token-attention ViT"),
    ("xcit_nano_12_p16_224", "'xcit_nano_12_p16_224' is a Xcit, not a plain token-attention ViT"),
    ("naflexvit_base_patch16_gap", "'naflexvit_base_patch16_gap' is a NaFlexVit, not a plain token-attention ViT"),
    ("eva02_tiny_patch14_224", "is a Eva, not a plain token-attention ViT"),
    ("swin_tiny_patch4_window7_224", "has no ViT attention blocks"),
])
def test_other_architectures_are_refused_before_any_weights_load(tmp_path, name, message):
    image = tmp_path / "a.png"
    write_image(image)
    result = runner.invoke(app, ["rollout", str(image), "--model", name, "-o", str(tmp_path / "out")],
                           catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_differential_attention_is_refused_at_planning_and_by_what_it_records():
    with pytest.raises(ModelChoiceError, match="uses DiffAttention attention, whose recorded tensor is not the matrix"):
        plan_model("test_vit", pretrained=False, attn_layer="diff")
    import timm

    model = timm.create_model("test_vit", pretrained=False, attn_layer="diff").eval()  # past the planning check
    with pytest.raises(UnsupportedModelError, match=r"shape \(1, 4, 101, 101\), not \(batch, 2 heads"):
        capture_attention(model, torch.randn(1, 3, 160, 160))


class Halve(nn.Module):
    def forward(self, x):
        return x / 2


def test_a_recorded_tensor_that_is_not_attention_is_refused():
    model = load_model("test_vit", pretrained=False)
    model.blocks[1].attn.attn_drop = Halve()  # the block now multiplies v by half its attention
    for with_grad in (False, True):
        with pytest.raises(UnsupportedModelError, match="not row-stochastic attention .* rows summing to 0.5"):
            capture_attention(model, torch.randn(2, 3, 160, 160), with_grad=with_grad, fusion=None)


def test_non_finite_outputs_fail_one_by_one_and_the_manifest_stays_strict_json(tmp_path, save_test_vit):
    import json

    model, _ = save_test_vit()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    checkpoint = tmp_path / "nan.pth"
    torch.save(model.state_dict(), checkpoint)
    for index in range(2):
        write_image(tmp_path / "in" / f"{index}.png", (32, 32), seed=index)
    result = runner.invoke(app, ["rollout", str(tmp_path / "in"), "--model", "test_vit", "--checkpoint",
                                 str(checkpoint), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "0.png: the model's output is not finite (NaN or inf): are the checkpoint's weights finite?" in text
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    entries = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) for line in lines]
    assert [e["status"] for e in entries] == ["failed", "failed"]
