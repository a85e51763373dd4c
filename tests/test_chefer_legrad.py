"""Chefer et al.'s rule and LeGrad: against independent implementations (full matrices, per-layer autograd
through the ordinary forward, finite differences), on the test architectures and on real weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BOTH_IMAGE, DEIT_WEIGHTS, invoke, needs_shared, random_attention, read_manifest, write_image
from test_capture import ARCHITECTURES, images_for
from vitexplain import CheferRelevance, LeGrad, load_model, preprocessing_for
from vitexplain.capture.record import explicit_attention
from vitexplain.capture.tokens import TokenLayout
from vitexplain.methods.chefer import chefer_relevance
from vitexplain.methods.legrad import legrad_map


def chefer_reference(attentions, gradients, readout, prefix, grid):
    """The rule with full N×N matrices, image by image (no shared code)."""
    masks = []
    for b in range(attentions[0].shape[0]):
        n = attentions[0].shape[-1]
        relevance = np.eye(n)
        for attention, gradient in zip(attentions, gradients):
            weighted = np.maximum(attention[b].double().numpy() * gradient[b].double().numpy(), 0).mean(axis=0)
            relevance = relevance + weighted @ relevance
        row = readout[b].double().numpy() @ (relevance - np.eye(n))
        patches = row[prefix:]
        masks.append((patches / patches.max()).reshape(grid))
    return torch.tensor(np.stack(masks))


def legrad_reference(gradients, prefix, grid):
    masks = []
    for b in range(gradients[0].shape[0]):
        total = sum(np.maximum(g[b].double().numpy(), 0).mean(axis=(0, 1)) for g in gradients) / len(gradients)
        patches = total[prefix:]
        masks.append((patches / patches.max()).reshape(grid))
    return torch.tensor(np.stack(masks))


def test_chefer_equals_the_rule_with_full_matrices():
    generator = torch.Generator().manual_seed(4)
    layout = TokenLayout(2, (3, 3), (0, 1))
    attentions = [random_attention(3, 4, layout.num_tokens, generator) for _ in range(4)]
    gradients = [torch.randn(a.shape, generator=generator, dtype=torch.float64) for a in attentions]
    readout = torch.zeros(3, layout.num_tokens, dtype=torch.float64)
    readout[:, :2] = 0.5  # a distilled model's readout
    torch.testing.assert_close(chefer_relevance(attentions, gradients, readout, layout).double(),
                               chefer_reference(attentions, gradients, readout, 2, (3, 3)), rtol=1e-5, atol=1e-6)


def test_chefer_by_hand_one_layer():
    # one layer, one head, CLS row of A ⊙ G = [0, 0.2, -0.1]: Ā row = [0, 0.2, 0]; R = I + Ā; (R − I) row = Ā row
    layout = TokenLayout(1, (1, 2), (0,))
    attention = torch.tensor([[[[0.5, 0.25, 0.25], [0, 1, 0], [0, 0, 1]]]], dtype=torch.float64)
    gradient = torch.zeros_like(attention)
    gradient[0, 0, 0, 1], gradient[0, 0, 0, 2] = 0.8, -0.4
    mask = chefer_relevance([attention], [gradient], torch.tensor([[1.0, 0, 0]], dtype=torch.float64), layout)
    torch.testing.assert_close(mask, torch.tensor([[[1.0, 0.0]]]))


def test_legrad_map_equals_the_mean_over_blocks_heads_and_rows():
    generator = torch.Generator().manual_seed(5)
    gradients = [torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    layout = TokenLayout(1, (2, 3), (0,))
    torch.testing.assert_close(legrad_map(gradients, layout).double(), legrad_reference(gradients, 1, (2, 3)),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=ARCHITECTURES[:8], ids=lambda a: f"{a[0]}{a[1] or ''}")
def architecture(request):
    name, kwargs, *_ = request.param
    return load_model(name, pretrained=False, **kwargs)


def ordinary_forward(model, images):
    """The model's own forward (no detaching, every block whole) with attentions and block outputs kept."""
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _a, output: outputs.append(output)) for block in model.blocks]
    try:
        with torch.enable_grad(), explicit_attention(model) as attentions:
            logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, attentions, outputs


def test_chefer_equals_per_layer_autograd_on_the_architectures(architecture):
    from vitexplain import capture_attention

    model, images, target = architecture, images_for(architecture), torch.tensor([2, 0])
    ours = CheferRelevance(model)(images, target=target)
    logits, attentions, _ = ordinary_forward(model, images)
    score = logits.gather(1, target.view(-1, 1)).sum()
    gradients = [torch.autograd.grad(score, a, retain_graph=True)[0] for a in attentions]
    layout = capture_attention(model, images).layout
    readout = capture_attention(model, images).readout
    expected = chefer_reference([a.detach() for a in attentions], gradients, readout, layout.num_prefix_tokens,
                                layout.grid)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)
    singles = torch.cat([CheferRelevance(model)(images[i:i + 1], target=target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, singles, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", ["1", "2", "all"])
def test_legrad_one_backward_equals_per_layer_autograd_through_the_ordinary_forward(architecture, layers):
    model, images, target = architecture, images_for(architecture), torch.tensor([1, 3])
    ours = LeGrad(model, layers=layers)(images, target=target)
    _, attentions, outputs = ordinary_forward(model, images)
    depth = len(attentions)
    chosen = range(depth - (depth if layers == "all" else int(layers)), depth)
    gradients = []
    for index in chosen:
        score = model.forward_head(model.norm(outputs[index])).gather(1, target.view(-1, 1)).sum()
        gradients.append(torch.autograd.grad(score, attentions[index], retain_graph=True)[0])
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(ours.shape[-2:])
    torch.testing.assert_close(ours.double(), legrad_reference(gradients, prefix, grid), rtol=1e-4, atol=1e-5)
    singles = torch.cat([LeGrad(model, layers=layers)(images[i:i + 1], target=target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, singles, rtol=1e-4, atol=1e-5)


def test_legrad_gradients_match_finite_differences_in_float64():
    model = load_model("test_vit", pretrained=False).double()
    images = images_for(model).double()
    target = torch.tensor([1, 4])
    explainer = LeGrad(model, layers="2")
    capture = explainer.capture(images)
    gradients = explainer.target_gradients(capture, target, retain_graph=False)
    depth = len(model.blocks)

    def block_score(layer: int, entry: tuple[int, ...], delta: float) -> float:
        """s_layer with A_layer[entry] moved by delta, in the ordinary forward."""
        attention = model.blocks[layer].attn
        attention.fused_attn = False

        def nudge(_module, _inputs, output):
            output = output.clone()
            output[entry] += delta
            return output

        hook = attention.attn_drop.register_forward_hook(nudge)
        outputs = []
        keep = model.blocks[layer].register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            with torch.no_grad():
                model(images)
                return float(model.forward_head(model.norm(outputs[0])).gather(1, target.view(-1, 1)).sum())
        finally:
            hook.remove()
            keep.remove()
            attention.fused_attn = True

    generator = torch.Generator().manual_seed(0)
    for layer in (depth - 2, depth - 1):
        for _ in range(3):
            entry = tuple(int(torch.randint(0, size, (1,), generator=generator)) for size in gradients[layer].shape)
            step = 1e-5
            numeric = (block_score(layer, entry, step) - block_score(layer, entry, -step)) / (2 * step)
            assert float(gradients[layer][entry]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert gradients[0] is None  # not a chosen block: not computed


@needs_shared
@pytest.mark.parametrize("method", [CheferRelevance, LeGrad])
def test_real_weights_put_each_class_on_its_half(method):
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    image = preprocessing_for(model)(BOTH_IMAGE)[None]
    masks = method(model).explain(image, [243, 282]).masks
    dog, cat = masks[0, 0, 0], masks[0, 1, 0]
    assert dog[:7].sum() > dog[7:].sum() and cat[7:].sum() > cat[:7].sum()


def test_command_line_names(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    write_image(tmp_path / "a.png", (32, 32))
    common = ["--model", "test_vit", "--checkpoint", checkpoint, "-o", tmp_path / "out", "-c", "3"]
    assert invoke("chefer", tmp_path / "a.png", *common).exit_code == 0
    assert invoke("legrad", tmp_path / "a.png", *common).exit_code == 0
    assert invoke("legrad", tmp_path / "a.png", *common, "--layers", "all").exit_code == 0
    assert [e["name"] for e in read_manifest(tmp_path / "out")] == ["a_chefer_c3", "a_legrad_l2_c3", "a_legrad_lall_c3"]
