"""grad-attention: the gradient-weighted attention of the last block(s), read at the readout row."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import BOTH_IMAGE, DEIT_WEIGHTS, needs_shared, random_attention, write_image
from test_capture import ARCHITECTURES, images_for
from vitexplain import GradientAttention, capture_attention, load_model, preprocessing_for
from vitexplain.capture.tokens import TokenLayout
from vitexplain.cli import app
from vitexplain.methods.grad_attention import gradient_attention

runner = CliRunner()


def reference(attentions, gradients, readout, prefix, grid, fusion, negatives):
    """Written out in numpy, image by image and layer by layer (no shared code)."""
    reduce = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    masks = []
    for b in range(attentions[0].shape[0]):
        total = 0
        for attention, gradient in zip(attentions, gradients):
            weighted = attention[b].double().numpy() * gradient[b].double().numpy()
            if negatives == "heads":
                fused = reduce(np.maximum(weighted, 0), axis=0)
            else:
                fused = np.maximum(reduce(weighted, axis=0), 0)
            total = total + fused
        mean = total / len(attentions)
        row = readout[b].double().numpy() @ mean
        patches = row[prefix:]
        masks.append((patches / patches.max()).reshape(grid))
    return torch.tensor(np.stack(masks))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("negatives", ["fused", "heads"])
@pytest.mark.parametrize("layers", [1, 3])
def test_equals_the_formula_written_out_on_random_attention(fusion, negatives, layers):
    generator = torch.Generator().manual_seed(layers)
    layout = TokenLayout(2, (3, 4), (0, 1))
    attentions = [random_attention(3, 4, layout.num_tokens, generator) for _ in range(layers)]
    gradients = [torch.randn(a.shape, generator=generator, dtype=torch.float64) for a in attentions]
    readout = torch.softmax(torch.randn(3, layout.num_tokens, generator=generator, dtype=torch.float64), -1)
    ours = gradient_attention(attentions, gradients, readout, layout, fusion, negatives)
    torch.testing.assert_close(ours.double(), reference(attentions, gradients, readout, 2, (3, 4), fusion, negatives),
                               rtol=1e-5, atol=1e-6)


def test_hand_computed_case_where_the_two_negative_orders_differ():
    layout = TokenLayout(1, (1, 2), (0,))
    attention = torch.full((1, 2, 3, 3), 1 / 3, dtype=torch.float64)
    gradient = torch.zeros_like(attention)
    gradient[0, 0, 0, 1], gradient[0, 0, 0, 2] = 3.0, -3.0  # head 0, CLS row: [0, +1, -1]
    gradient[0, 1, 0, 1], gradient[0, 1, 0, 2] = -6.0, 6.0  # head 1, CLS row: [0, -2, +2]
    readout = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    # fused first: mean row [0, -0.5, 0.5] → relu [0, 0, 0.5] → patches [0, 1]
    torch.testing.assert_close(gradient_attention([attention], [gradient], readout, layout, "mean", "fused"),
                               torch.tensor([[[0.0, 1.0]]]))
    # per head first: relu rows [0, 1, 0] and [0, 0, 2] → mean [0, 0.5, 1] → patches [0.5, 1]
    torch.testing.assert_close(gradient_attention([attention], [gradient], readout, layout, "mean", "heads"),
                               torch.tensor([[[0.5, 1.0]]]))


@pytest.fixture(scope="module", params=ARCHITECTURES[:8], ids=lambda a: f"{a[0]}{a[1] or ''}")
def architecture(request):
    name, kwargs, *_ = request.param
    return load_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("layers", ["1", "2", "all"])
def test_equals_per_layer_autograd_through_the_ordinary_forward(architecture, layers):
    model = architecture
    images = images_for(model)
    target = torch.tensor([1, 0])
    explainer = GradientAttention(model, layers=layers, negatives="heads" if layers == "2" else "fused")
    ours = explainer(images, target=target)
    capture = capture_attention(model, images, with_grad=True)
    depth = len(capture.attentions)
    chosen = list(range(depth - (depth if layers == "all" else int(layers)), depth))
    score = capture.logits.gather(1, target.view(-1, 1)).sum()
    gradients = [torch.autograd.grad(score, capture.attentions[i], retain_graph=True)[0] for i in chosen]
    layout = capture.layout
    expected = reference([capture.attentions[i].detach() for i in chosen], gradients, capture.readout,
                         layout.num_prefix_tokens, layout.grid, "mean", explainer.settings["negatives"])
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
    singles = torch.cat([explainer(images[i:i + 1], target=target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, singles, rtol=1e-4, atol=1e-5)


def test_the_backward_pass_goes_only_as_deep_as_the_chosen_blocks():
    model = load_model("test_vit", pretrained=False)
    reached = []
    # the first block's MLP lies between its attention and every later block: reached only if A_0 is
    hook = model.blocks[0].mlp.fc2.register_full_backward_hook(lambda *_: reached.append(1))
    try:
        GradientAttention(model, layers="1")(images_for(model), target=0)
        assert reached == []
        GradientAttention(model, layers="all")(images_for(model), target=0)
        assert len(reached) == 1
    finally:
        hook.remove()


@needs_shared
@pytest.mark.parametrize("layers, negatives", [("1", "fused"), ("2", "heads"), ("all", "fused")])
def test_real_weights_put_each_class_on_its_half(layers, negatives):
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    image = preprocessing_for(model)(BOTH_IMAGE)[None]
    masks = GradientAttention(model, layers=layers, negatives=negatives).explain(image, [243, "tiger cat"]).masks
    dog, cat = masks[0, 0, 0], masks[0, 1, 0]
    assert dog[:7].sum() > dog[7:].sum() and cat[7:].sum() > cat[:7].sum()


def test_command_line_names_checks_and_no_sweep(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    image = tmp_path / "a.png"
    write_image(image, (32, 32))
    common = ["--model", "test_vit", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, ["grad-attention", str(image), "-c", "2", "--layers", "2", *common])
    assert result.exit_code == 0, result.output
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert entry["name"] == "a_grad-attention_mean_l2_fused_c2" and entry["target"] == 2
    assert entry["request"]["params"] == {"fusion": "mean", "layers": "2", "negatives": "fused"}
    for layers, message in (("20", "--layers 20: the model has 6 blocks"), ("x", "--layers must be a number of blocks")):
        bad = runner.invoke(app, ["grad-attention", str(image), "--layers", layers, *common])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
    sweep = runner.invoke(app, ["sweep", str(image), "--method", "grad-attention", *common])
    assert sweep.exit_code == 2 and "grad-attention has no discard ratio to sweep" in " ".join(sweep.output.split())
