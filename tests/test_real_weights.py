"""Real ImageNet weights (../shared) on a photo of a bull mastiff (upper half) and a tiger cat (lower half)."""
from __future__ import annotations

import pytest
import torch

from conftest import BOTH_IMAGE, DEIT_WEIGHTS, needs_shared
from vitexplain import AttentionRollout, GradientRollout, load_model, preprocessing_for
from vitexplain.io.inputs import load_rgb
from vitexplain.io.preprocess import to_model_input

pytestmark = needs_shared
BULL_MASTIFF, TIGER_CAT = 243, 282


@pytest.fixture(scope="module")
def deit_and_image():
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    return model, to_model_input(load_rgb(BOTH_IMAGE), preprocessing_for(model))[None]


def halves(mask: torch.Tensor) -> tuple[float, float]:
    rows = mask.shape[0] // 2
    return float(mask[:rows].sum()), float(mask[rows:].sum())


def test_top1_is_bull_mastiff_with_tiger_cat_in_top3(deit_and_image):
    model, image = deit_and_image
    with torch.no_grad():
        top3 = model(image).topk(3).indices[0].tolist()
    assert top3[0] == BULL_MASTIFF and TIGER_CAT in top3


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_gradient_rollout_is_class_specific(deit_and_image, fusion):
    model, image = deit_and_image
    explanation = GradientRollout(model, fusion=fusion, discard_ratio=0.9).explain(image, [BULL_MASTIFF, TIGER_CAT])
    dog_upper, dog_lower = halves(explanation.masks[0, 0, 0])
    cat_upper, cat_lower = halves(explanation.masks[0, 1, 0])
    assert dog_upper > dog_lower, (dog_upper, dog_lower)
    assert cat_lower > cat_upper, (cat_upper, cat_lower)


def test_rollout_is_not_degenerate(deit_and_image):
    model, image = deit_and_image
    mask = AttentionRollout(model, fusion="max", discard_ratio=0.9)(image)[0]
    assert mask.shape == (14, 14) and float(mask.max()) == 1.0
    assert float(mask.std()) > 0.05


def test_gradient_rollout_on_real_attention_equals_the_original_order_written_out(deit_and_image):
    from test_methods import reference_gradient_rollout
    from vitexplain import capture_attention

    model, image = deit_and_image
    capture = capture_attention(model, image, with_grad=True)
    gradients = capture.gradients(torch.tensor([TIGER_CAT]))
    attentions = [a.detach() for a in capture.attentions]
    expected = reference_gradient_rollout(attentions, gradients, "mean", 0.9, 1, (14, 14))
    ours = GradientRollout(model, fusion="mean", discard_ratio=0.9)(image, target=TIGER_CAT)
    torch.testing.assert_close(ours.double(), expected, atol=2e-5, rtol=1e-3)
