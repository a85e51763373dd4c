"""``lrp``: against an independent implementation (a plain functional forward with explicit ``.detach()`` where
the rules say, then ``autograd.grad``) on the test architectures and the real weights; conservation; the
real photo's two classes; batch == singles; the command line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BOTH_IMAGE, DEIT_WEIGHTS, SHARED, invoke, needs_shared, read_manifest, write_image
from test_capture import ARCHITECTURES, images_for
from vitexplain import LayerwiseRelevance, load_model, preprocessing_for
from vitexplain.capture.record import capture_attention
from vitexplain.capture.rules import relevance_rules
from vitexplain.methods.lrp import RULES, chosen_layer

VIT_WEIGHTS = SHARED / "weights" / "vit_tiny_patch16_224.pth"


# ---- the independent implementation: timm's ViT written out, the rules as explicit detaches ----------------------

def half(t):
    return 0.5 * t + (0.5 * t).detach()


def norm_ref(module, x):
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        sigma = ((x - mean) ** 2).mean(-1, keepdim=True).add(module.eps).sqrt()
        out = (x - mean) / sigma.detach() * module.weight
        return out + module.bias if module.bias is not None else out
    assert "RmsNorm" in type(module).__name__, type(module)
    rms = x.pow(2).mean(-1, keepdim=True).add(module.eps).sqrt()
    return x / rms.detach() * module.weight


def mlp_ref(mlp, x, identity):
    assert isinstance(mlp.norm, nn.Identity)
    u = F.linear(x, mlp.fc1.weight, mlp.fc1.bias)
    y = F.gelu(u)
    if identity:
        y = u * (y / u).detach()
    return F.linear(y, mlp.fc2.weight, mlp.fc2.bias)


def attention_ref(attn, x, rule):
    batch, tokens, channels = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = norm_ref(attn.q_norm, qkv[0]), norm_ref(attn.k_norm, qkv[1]), qkv[2]
    if rule == "attnlrp":
        q, k = half(q), half(k)
    a = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)
    if rule != "attnlrp":
        a = a.detach()
    out = a @ v
    if rule == "attnlrp":
        out = half(out)
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, channels), attn.proj.weight, attn.proj.bias)


def layer_scale(ls, x):
    return x * ls.gamma if hasattr(ls, "gamma") else x


def pool_ref(pool, x, identity):
    batch, tokens, channels = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed
    q = F.linear(pool.latent.expand(batch, -1, -1), pool.q.weight, pool.q.bias)
    q = q.reshape(batch, pool.latent_len, pool.num_heads, -1).transpose(1, 2)
    kv = F.linear(x, pool.kv.weight, pool.kv.bias).reshape(batch, tokens, 2, pool.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = norm_ref(pool.q_norm, q), norm_ref(pool.k_norm, kv[0]), kv[1]
    a = (q * pool.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # the pool's attention: its plain gradient
    out = F.linear((a @ v).transpose(1, 2).reshape(batch, pool.latent_len, channels), pool.proj.weight, pool.proj.bias)
    out = out + mlp_ref(pool.mlp, norm_ref(pool.norm, out), identity)
    return out[:, 0] if pool.pool == "token" else out.mean(1)


def head_ref(model, x, identity):
    x = norm_ref(model.norm, x)
    if hasattr(model, "head_dist"):
        return (F.linear(x[:, 0], model.head.weight, model.head.bias)
                + F.linear(x[:, 1], model.head_dist.weight, model.head_dist.bias)) / 2
    if model.attn_pool is not None:
        x = pool_ref(model.attn_pool, x, identity)
    elif model.global_pool == "avg":
        x = x[:, model.num_prefix_tokens:].mean(1)
    else:
        x = x[:, 0]
    return F.linear(norm_ref(model.fc_norm, x), model.head.weight, model.head.bias)


def reference_relevance(model, images, rule, target, classes):
    """``R_l`` ``(B, N)`` at every block position ``0 … depth`` and the logits, by the written-out forward."""
    identity = rule != "cp"
    with torch.enable_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        entering = [x]
        for block in model.blocks:
            x = x + layer_scale(block.ls1, attention_ref(block.attn, norm_ref(block.norm1, x), rule))
            x = x + layer_scale(block.ls2, mlp_ref(block.mlp, norm_ref(block.norm2, x), identity))
            entering.append(x)
        logits = head_ref(model, x, identity)
        scores = logits.log_softmax(-1) if target == "log-softmax" else logits
        score = scores.gather(1, classes.view(-1, 1)).sum()
        gradients = torch.autograd.grad(score, entering)
    return [(h * g).sum(-1).detach() for h, g in zip(entering, gradients)], logits.detach()


def mask_ref(relevance, prefix, grid):
    patches = relevance[:, prefix:].clamp_min(0)
    return (patches / patches.amax(1, keepdim=True).clamp_min(1e-30)).view(-1, *grid)


def randomise(model, seed=0):
    """Non-zero biases, LayerNorm shifts and gains (timm initialises them to 0 and 1), so the test sees them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("gamma"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=lambda a: f"{a[0]}{a[1] or ''}")
def architecture(request):
    name, kwargs, *_ = request.param
    return randomise(load_model(name, pretrained=False, **kwargs))


def check_against_reference(model, images, rule, target, classes, layers, rtol=1e-4, atol=1e-5):
    relevance, logits = reference_relevance(model, images, rule, target, classes)
    prefix = int(model.num_prefix_tokens)
    depth = len(model.blocks)
    for layer in layers:
        explainer = LayerwiseRelevance(model, rule=rule, layer=str(layer), target=target)
        explanation = explainer.explain(images, [classes])
        grid = tuple(explanation.masks.shape[-2:])
        expected = mask_ref(relevance[chosen_layer(str(layer), depth)], prefix, grid)
        torch.testing.assert_close(explanation.masks[:, 0, 0], expected, rtol=rtol, atol=atol,
                                   msg=lambda m: f"rule {rule}, target {target}, layer {layer}: {m}")
    torch.testing.assert_close(explanation.logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["log-softmax", "logit"])
@pytest.mark.parametrize("rule", list(RULES))
def test_lrp_equals_the_written_out_rules_on_the_architectures(architecture, rule, target):
    model = architecture
    depth = len(model.blocks)
    check_against_reference(model, images_for(model), rule, target, torch.tensor([2, 0]),
                            (0, "auto", depth - 1, depth))


@needs_shared
@pytest.mark.parametrize("name, weights", [("deit_tiny_patch16_224", DEIT_WEIGHTS), ("vit_tiny_patch16_224", VIT_WEIGHTS)])
@pytest.mark.parametrize("rule", list(RULES))
def test_lrp_equals_the_written_out_rules_on_real_weights(name, weights, rule):
    model = load_model(name, checkpoint=weights)
    images = torch.cat([preprocessing_for(model)(BOTH_IMAGE)[None], images_for(model, batch=1, seed=3)])
    for target in ("log-softmax", "logit"):
        check_against_reference(model, images, rule, target, torch.tensor([243, 282]), (0, "auto", 11), atol=1e-4)


def test_the_rules_keep_the_forward_values_exactly(architecture):
    model = architecture
    images = images_for(model)
    plain = capture_attention(model, images, with_grad=True).logits.detach()  # timm's explicit path, as the rules'
    for attention, identity in set(RULES.values()):
        with torch.enable_grad(), relevance_rules(model, attention, identity):
            ruled = capture_attention(model, images, with_grad=True).logits
        assert torch.equal(ruled.detach(), plain)


def test_batch_equals_singles(architecture):
    model = architecture
    images, classes = images_for(model, batch=3), torch.tensor([1, 4, 0])
    for rule in RULES:
        batch = LayerwiseRelevance(model, rule=rule)(images, target=classes)
        singles = torch.cat([LayerwiseRelevance(model, rule=rule)(images[i:i + 1], target=classes[i:i + 1])
                             for i in range(3)])
        torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-5)


def zero_biases(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    return model


def relevance_sums(model, images, attention, identity, classes):
    """``Σ_tokens R_l`` at every position ``0 … depth`` (logit target), through the library's rules, and the logits."""
    depth = len(model.blocks)
    with torch.enable_grad(), relevance_rules(model, attention, identity):
        capture = capture_attention(model, images, with_grad=True, entering=range(depth + 1))
        score = capture.logits.gather(1, classes.view(-1, 1)).sum()
        tokens = [capture.entering[p] for p in range(depth + 1)]
        gradients = torch.autograd.grad(score, tokens)
    sums = torch.stack([(h * g).sum(dim=(1, 2)) for h, g in zip(tokens, gradients)], dim=1)  # (B, depth + 1)
    return sums.detach(), capture.logits.detach().gather(1, classes.view(-1, 1))


def check_conservation(model, images, classes, rtol):
    sums, logits = relevance_sums(model, images, "constant", True, classes)
    torch.testing.assert_close(sums, logits.expand_as(sums), rtol=rtol, atol=rtol * logits.abs().max().item())
    plain_gelu, _ = relevance_sums(model, images, "constant", False, classes)
    assert (plain_gelu[:, :-1] - logits).abs().max() > 100 * rtol * logits.abs().max()  # cp: not conserved


def test_cp_conservative_conserves_relevance_with_biases_zeroed():
    model = zero_biases(randomise(load_model("test_vit", pretrained=False).double()))
    images = images_for(model).double()
    check_conservation(model, images, torch.tensor([2, 0]), rtol=1e-9)


@needs_shared
def test_cp_conservative_conserves_relevance_on_vit_tiny():
    model = zero_biases(load_model("vit_tiny_patch16_224", checkpoint=VIT_WEIGHTS))
    image = preprocessing_for(model)(BOTH_IMAGE)[None]
    check_conservation(model, image, torch.tensor([243]), rtol=1e-4)  # 4 digits, all 13 positions


@needs_shared
@pytest.mark.parametrize("rule", list(RULES))
def test_real_weights_put_each_class_on_its_half(rule):
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    image = preprocessing_for(model)(BOTH_IMAGE)[None]
    masks = LayerwiseRelevance(model, rule=rule).explain(image, [243, 282]).masks
    dog, cat = masks[0, 0, 0], masks[0, 1, 0]
    assert dog[:7].sum() > dog[7:].sum() and cat[7:].sum() > cat[:7].sum()


def test_layer_setting():
    assert [chosen_layer("auto", depth) for depth in (12, 6, 9, 1)] == [9, 5, 7, 1]
    assert chosen_layer("0", 12) == 0 and chosen_layer("12", 12) == 12
    with pytest.raises(ValueError, match="--layer 13: the model has 12 blocks"):
        chosen_layer("13", 12)


def test_command_line(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    write_image(tmp_path / "a.png", (32, 32))
    common = ["--model", "test_vit", "--checkpoint", checkpoint, "-o", tmp_path / "out", "-c", "3", "--save-raw"]
    assert invoke("lrp", tmp_path / "a.png", *common).exit_code == 0
    assert invoke("lrp", tmp_path / "a.png", *common, "--rule", "attnlrp", "--layer", "2", "--target", "logit").exit_code == 0
    records = read_manifest(tmp_path / "out")
    assert [e["name"] for e in records] == ["a_lrp_cp_lauto_log-softmax_c3", "a_lrp_attnlrp_l2_logit_c3"]
    assert records[1]["request"]["params"] == {"rule": "attnlrp", "layer": "2", "target": "logit"}
    bad = invoke("lrp", tmp_path / "a.png", *common, "--layer", "7")
    assert bad.exit_code == 2 and "--layer 7: the model has 6 blocks" in " ".join(bad.output.split())
    bad = invoke("lrp", tmp_path / "a.png", *common, "--rule", "lrp-eps")
    assert bad.exit_code == 2
