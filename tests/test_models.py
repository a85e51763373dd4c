"""Model loading: local checkpoints, timm's pretrained path (offline), names, classes."""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import DEIT_WEIGHTS, needs_shared
from vitexplain.models import ModelLoadError, check_model_name, class_names_for, class_synonyms_for, load_model, preprocessing_for, read_state_dict, resolve_class


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "ddp"])
def test_checkpoint_layouts_load_with_inferred_classes(tmp_path, layout):
    reference = timm.create_model("test_vit", pretrained=False, num_classes=7).eval()
    state = reference.state_dict()
    wrapped = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = load_model("test_vit", checkpoint=path)
    assert model.num_classes == 7 and not model.training
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    reference = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    path = tmp_path / "weights.safetensors"
    save_file(reference.state_dict(), str(path))
    assert read_state_dict(path).keys() == reference.state_dict().keys()
    assert load_model("test_vit", checkpoint=path).num_classes == 3


def test_checkpoint_of_another_architecture_is_explained(tmp_path):
    path = tmp_path / "vit2.pth"
    torch.save(timm.create_model("test_vit2", pretrained=False).state_dict(), path)
    with pytest.raises(ModelLoadError, match="does not fit 'test_vit'.*architecture it was trained with"):
        load_model("test_vit", checkpoint=path)


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("test_vit", checkpoint=tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("test_vit", checkpoint=garbage)
    not_tensors = tmp_path / "dict.pth"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ModelLoadError, match="no state dict of tensors"):
        load_model("test_vit", checkpoint=not_tensors)


def test_pretrained_without_hub_says_how_to_proceed(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        load_model("test_vit", pretrained=True)
    message = str(error.value)
    assert "--checkpoint" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


@needs_shared
def test_pretrained_path_through_timm_with_a_local_file():
    """timm's own pretrained loader (pretrained=True) fed a local file instead of the hub."""
    via_timm = load_model("deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(DEIT_WEIGHTS)})
    via_checkpoint = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    for a, b in zip(via_timm.state_dict().values(), via_checkpoint.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_model_names_suggest_close_ones():
    with pytest.raises(ModelLoadError, match="Did you mean: .*deit_tiny_patch16_224"):
        check_model_name("deit_tiny_patch16_22")
    assert check_model_name("deit_tiny_patch16_224.fb_in1k") == "deit_tiny_patch16_224.fb_in1k"


def test_model_without_attention_blocks_is_refused():
    with pytest.raises(ModelLoadError, match="no ViT attention blocks"):
        load_model("resnet18", pretrained=False)


def test_preprocessing_resizes_to_model_size_with_its_normalisation():
    deit = preprocessing_for(load_model("deit_tiny_patch16_224", pretrained=False))
    assert deit.size == (224, 224) and deit.mean == pytest.approx((0.485, 0.456, 0.406))
    assert deit.std == pytest.approx((0.229, 0.224, 0.225))
    vit = preprocessing_for(load_model("test_vit", pretrained=False, img_size=(96, 64)))
    assert vit.size == (96, 64) and vit.mean == (0.5, 0.5, 0.5)


def test_class_names_and_resolution():
    synonyms = class_synonyms_for(1000)
    names = class_names_for(1000)
    assert (names[243], names[282], names[404]) == ("bull mastiff", "tiger cat", "airliner")
    assert resolve_class("243", synonyms) == 243
    assert resolve_class("Tiger Cat", synonyms) == 282
    assert resolve_class("punch bag", synonyms) == 747  # any WordNet lemma of the class
    with pytest.raises(ValueError, match="out of range: the model has classes 0..999"):
        resolve_class("1000", synonyms)
    with pytest.raises(ValueError, match="Did you mean: 'tiger cat'"):
        resolve_class("tigr cat", synonyms)
    with pytest.raises(ValueError, match="ambiguous: classes 134, 517"):
        resolve_class("crane", synonyms)
    assert class_names_for(3) == ("class_0", "class_1", "class_2")
    assert resolve_class("class_2", class_synonyms_for(3)) == 2
