"""Attention capture on real timm architectures (random init): exactness, layout, readout, gradients."""
from __future__ import annotations

import pytest
import torch

from vitexplain import AttentionRollout, GradientRollout, capture_attention, load_model, preprocessing_for
from vitexplain.capture.record import attention_modules, explicit_attention
from vitexplain.capture.native import has_native_kernel

# (model name, create_model kwargs, prefix tokens, grid, protected readout tokens)
ARCHITECTURES = [
    ("deit_tiny_patch16_224", {}, 1, (14, 14), (0,)),
    ("deit_tiny_distilled_patch16_224", {}, 2, (14, 14), (0, 1)),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 70, "num_classes": 10}, 5, (5, 5), (0,)),
    ("test_vit", {"reg_tokens": 4}, 5, (10, 10), (0,)),
    ("test_vit2", {}, 1, (10, 10), ()),  # global average pooling, one register token, no CLS
    ("test_vit3", {}, 1, (10, 10), ()),  # attention-pool ('map') head
    ("test_vit", {"img_size": (96, 64)}, 1, (6, 4), (0,)),  # non-square, non-224
    ("test_vit4", {"img_size": 112}, 1, (7, 7), ()),
    ("test_vit", {"qkv_bias": False}, 1, (10, 10), (0,)),  # the native kernel with a zero q/k/v bias
    ("test_vit", {"qk_norm": True}, 1, (10, 10), (0,)),  # q/k norms: timm's explicit path only
]


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=lambda a: f"{a[0]}{a[1] or ''}")
def architecture(request):
    name, kwargs, prefix, grid, protected = request.param
    model = load_model(name, pretrained=False, **kwargs)
    return model, prefix, grid, protected


def images_for(model, batch=2, seed=0):
    height, width = preprocessing_for(model).size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_capture_leaves_logits_unchanged(architecture):
    model, *_ = architecture
    images = images_for(model)
    with torch.no_grad():
        fused_logits = model(images)
    modules = attention_modules(model)
    assert all(m.fused_attn for m in modules)  # timm's default: fused scaled_dot_product_attention
    captured = capture_attention(model, images)
    assert all(m.fused_attn for m in modules)  # restored afterwards
    torch.testing.assert_close(captured.logits, fused_logits, rtol=1e-5, atol=1e-5)  # fused vs explicit: rounding only
    for m in modules:
        m.fused_attn = False
    try:
        with torch.no_grad():
            explicit_logits = model(images)
    finally:
        for m in modules:
            m.fused_attn = True
    # the same arithmetic but for the last block's MLP, which runs on fewer rows: a few ulps at most
    torch.testing.assert_close(captured.logits, explicit_logits, rtol=1e-6, atol=1e-6)


@pytest.fixture
def native_calls(monkeypatch):
    """The ``average_attn_weights`` flag of every call to the native attention kernel."""
    calls = []
    kernel = torch._native_multi_head_attention

    def counting(*args):
        calls.append(args[11])
        return kernel(*args)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting)
    return calls


@pytest.mark.parametrize("fusion", [None, "mean", "max", "min"])
def test_native_kernel_records_what_timms_explicit_path_records(architecture, fusion, native_calls):
    model, *_ = architecture
    images = images_for(model)
    captured = capture_attention(model, images, fusion=fusion)
    with torch.enable_grad(), explicit_attention(model, fusion) as expected:  # with gradients: timm's own path
        model(images)
    native = [has_native_kernel(m) for m in attention_modules(model)]
    assert native_calls == [fusion == "mean"] * sum(native)  # the kernel averages heads itself for mean fusion
    assert all(native) or not any(native)  # every test architecture is one or the other
    assert all(native) == isinstance(model.blocks[0].attn.q_norm, torch.nn.Identity)
    for ours, reference in zip(captured.attentions, expected):
        assert ours.shape == reference.shape == (2, 1 if fusion else model.blocks[0].attn.num_heads, *ours.shape[2:])
        torch.testing.assert_close(ours, reference.detach(), rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(m) for m in attention_modules(model))  # timm's forward is back


def test_native_kernel_only_where_it_computes_what_is_asked(native_calls):
    """Gradients, autocast, training mode and attention masks all take timm's explicit path."""
    model = load_model("test_vit", pretrained=False)
    images = images_for(model)
    capture_attention(model, images, with_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        capture_attention(model, images, fusion="mean")
    model.train()
    try:
        capture_attention(model, images, fusion="mean")
    finally:
        model.eval()
    x = torch.randn(2, 5, model.embed_dim)
    with torch.no_grad(), explicit_attention(model) as recorded:
        model.blocks[0].attn(x, attn_mask=torch.zeros(5, 5))
    assert native_calls == [] and recorded[0].shape == (2, model.blocks[0].attn.num_heads, 5, 5)
    capture_attention(model, images, fusion="mean")
    assert native_calls == [True] * len(model.blocks)


def test_last_block_updates_only_the_tokens_the_head_reads(architecture):
    model, prefix, grid, protected = architecture
    lengths = []
    hook = model.norm.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    try:
        capture_attention(model, images_for(model))
    finally:
        hook.remove()
    assert lengths == [prefix if protected else prefix + grid[0] * grid[1]]  # token pooling: the prefix only
    assert "forward" not in vars(model.blocks[-1])  # the block's own forward is back


def test_layout_and_readout(architecture):
    model, prefix, grid, protected = architecture
    images = images_for(model)
    captured = capture_attention(model, images)
    layout = captured.layout
    assert (layout.num_prefix_tokens, layout.grid, layout.protected_tokens) == (prefix, grid, protected)
    assert len(captured.attentions) == len(model.blocks)
    heads = model.blocks[0].attn.num_heads
    for attention in captured.attentions:
        assert attention.shape == (2, heads, layout.num_tokens, layout.num_tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, heads, layout.num_tokens))
    torch.testing.assert_close(captured.readout.sum(-1), torch.ones(2))
    assert (captured.readout >= 0).all()


def test_masks_are_grid_shaped_and_batch_independent(architecture):
    model, _, grid, _ = architecture
    images = images_for(model, batch=4)
    for explainer in (AttentionRollout(model, "max", 0.0), GradientRollout(model, "mean", 0.9)):
        batched = explainer(images)
        assert batched.shape == (4, *grid)
        torch.testing.assert_close(batched.amax(dim=(1, 2)), torch.ones(4))
        singles = torch.cat([explainer(images[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


def test_captured_attention_equals_attention_recomputed_from_qkv():
    model = load_model("deit_tiny_patch16_224", pretrained=False)
    images = images_for(model, batch=2)
    block_inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0])) for b in model.blocks]
    try:
        captured = capture_attention(model, images)
    finally:
        for h in hooks:
            h.remove()
    for block, x, attention in zip(model.blocks, block_inputs, captured.attentions):
        attn = block.attn
        batch, n, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        expected = (q @ k.transpose(-2, -1) / attn.head_dim ** 0.5).softmax(-1)
        torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-6)


def test_map_readout_is_the_pool_attention():
    model = load_model("test_vit3", pretrained=False)
    images = images_for(model, batch=2)
    captured = capture_attention(model, images)
    pool = model.attn_pool
    pool.fused_attn = False
    weights = []
    original_softmax = torch.Tensor.softmax
    # the explicit path of AttentionPoolLatent computes attn.softmax(dim=-1): intercept it once
    torch.Tensor.softmax = lambda self, *a, **k: weights.append(original_softmax(self, *a, **k)) or weights[-1]
    try:
        with torch.no_grad():
            pool(model.forward_features(images))
    finally:
        torch.Tensor.softmax = original_softmax
        pool.fused_attn = True
    torch.testing.assert_close(captured.readout, weights[-1].mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(captured.readout, torch.full_like(captured.readout, 1 / captured.readout.shape[1]))


def test_gradients_arrive_in_layer_order_and_match_finite_differences():
    """∂y_c/∂A_l[b,h,i,j] equals (y(A_l + ε·e) − y(A_l − ε·e)) / 2ε for every layer l."""
    model = load_model("test_vit", pretrained=False).double()
    images = images_for(model, batch=2).double()
    captured = capture_attention(model, images, with_grad=True)
    target = torch.tensor([3, 1])
    gradients = captured.gradients(target)
    epsilon, entry = 1e-6, (1, 1, 0, 5)  # batch 1, head 1, CLS row, token 5

    def logit_with_perturbation(layer: int, delta: float) -> float:
        def perturb(_m, _i, out):
            out = out.clone()
            out[entry] += delta
            return out
        hook = model.blocks[layer].attn.attn_drop.register_forward_hook(perturb)
        try:
            # with gradients the capture runs timm's explicit path, through attn_drop and this hook
            return float(capture_attention(model, images, with_grad=True).logits[1, 1].detach())
        finally:
            hook.remove()

    numeric = [(logit_with_perturbation(l, epsilon) - logit_with_perturbation(l, -epsilon)) / (2 * epsilon)
               for l in range(len(model.blocks))]
    analytic = [float(g[entry]) for g in gradients]
    assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-9)
    assert len(set(round(a, 12) for a in analytic)) == len(analytic)  # layers distinguishable: order is checked
    assert all(float(g[0].abs().sum()) > 0 for g in gradients)


def test_gradients_equal_those_through_the_whole_last_block():
    model = load_model("deit_tiny_distilled_patch16_224", pretrained=False).double()
    images = images_for(model).double()
    target = torch.tensor([3, 1])
    shortened = capture_attention(model, images, with_grad=True).gradients(target)
    with torch.enable_grad(), explicit_attention(model) as attentions:
        logits = model(images)
    full = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), attentions)
    for ours, reference in zip(shortened, full):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-13)
    assert shortened[-1][:, :, 2:].abs().sum() == 0  # patch-token rows of the last layer reach no logit


def test_gradient_rollout_defaults_to_top1_and_honours_targets():
    model = load_model("test_vit", pretrained=False)
    images = images_for(model, batch=3)
    explanation = GradientRollout(model).explain(images)
    torch.testing.assert_close(explanation.targets[:, 0], explanation.logits.argmax(-1))
    several = GradientRollout(model).explain(images, [7, explanation.logits.argmax(-1)])
    assert several.masks.shape == (3, 2, 1, 10, 10)
    assert several.targets[:, 0].tolist() == [7, 7, 7]
    torch.testing.assert_close(several.masks[:, 1], explanation.masks[:, 0])
    torch.testing.assert_close(GradientRollout(model)(images, target=7), several.masks[:, 0, 0])
    assert not torch.allclose(several.masks[:, 0], several.masks[:, 1])


def test_without_the_private_kernel_capture_records_the_same_through_timms_path(monkeypatch):
    model = load_model("test_vit", pretrained=False)
    images = images_for(model)
    with_kernel = capture_attention(model, images, fusion="mean")
    monkeypatch.delattr(torch, "_native_multi_head_attention")
    assert not any(has_native_kernel(m) for m in attention_modules(model))
    without = capture_attention(model, images, fusion="mean")
    torch.testing.assert_close(without.logits, with_kernel.logits, rtol=1e-5, atol=1e-6)
    for ours, reference in zip(without.attentions, with_kernel.attentions):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["signature", "shapes"])
def test_a_changed_private_kernel_falls_back_to_timms_path(monkeypatch, change):
    model = load_model("test_vit", pretrained=False)
    images = images_for(model)
    reference = capture_attention(model, images, fusion="max")
    calls = []

    def changed(*args):
        calls.append(len(args))
        if change == "signature":
            raise TypeError("_native_multi_head_attention() takes 12 positional arguments but 13 were given")
        return args[0], torch.zeros(1)  # weights of the wrong shape

    monkeypatch.setattr(torch, "_native_multi_head_attention", changed)
    captured = capture_attention(model, images, fusion="max")
    assert calls == [13]  # tried once; the rest of the capture uses timm's path
    torch.testing.assert_close(captured.logits, reference.logits, rtol=1e-5, atol=1e-6)
    for ours, expected in zip(captured.attentions, reference.attentions):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
