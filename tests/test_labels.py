"""``--labels``: a fine-tuned head's own class names, in ``--class``, the manifest and ``evaluate``; bad files refused."""
from __future__ import annotations

import json

import pytest

from conftest import invoke, read_manifest, said, write_image
from vitexplain.models import ModelChoiceError, read_labels

NAMES = ("benign", "malignant", "normal")


@pytest.mark.parametrize("text", ["benign\nmalignant\n\n  normal  \n", json.dumps(list(NAMES)),
                                  json.dumps({"2": "normal", "0": "benign", "1": "malignant"})],
                         ids=["lines", "json-list", "json-object"])
def test_the_three_forms_read_alike(tmp_path, text):
    (tmp_path / "labels").write_text(text)
    assert read_labels(tmp_path / "labels", 3) == NAMES


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("\n \n", "holds no class names"),
    ("a\nb\n", "names 2 classes; the model's head has 3"),
    ("a\nb\nA\n", "'A' names classes 0 and 2"),
    ('{"0": "a", "2": "b", "3": "c"}', "the indices must be 0…2, each once"),
    ('["a", "", "c"]', "every class name must be non-empty text"),
    ("[1, 2", "not valid JSON"),
])
def test_bad_label_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ModelChoiceError, match=message):
        read_labels(path, 3)


@pytest.fixture
def fine_tuned(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=3)
    (tmp_path / "labels.txt").write_text("\n".join(NAMES))
    for index in range(2):
        write_image(tmp_path / "in" / f"x{index}.png", (32, 32), seed=index)
    return checkpoint, tmp_path / "labels.txt", tmp_path / "in"


def test_class_by_name_on_a_fine_tuned_three_class_checkpoint(tmp_path, fine_tuned):
    checkpoint, labels, images = fine_tuned
    common = ["--model", "test_vit", "--checkpoint", checkpoint, "-o", tmp_path / "out"]
    result = invoke("grad-rollout", images, *common, "--labels", labels, "--class", "Malignant")
    assert result.exit_code == 0, result.output
    entries = read_manifest(tmp_path / "out")
    assert [(e["target"], e["target_name"]) for e in entries] == [(1, "malignant")] * 2
    assert all(e["predicted_name"] == NAMES[e["predicted"]] for e in entries)
    assert [e["name"] for e in entries] == ["x0_grad-rollout_mean_d0.9_c1", "x1_grad-rollout_mean_d0.9_c1"]
    # the names are part of the request: without them it is another request, whose names are class_<i>
    plain = invoke("grad-rollout", images, *common, "--class", "1")
    assert plain.exit_code == 0 and "2 already complete" not in said(plain)
    entries = read_manifest(tmp_path / "out")
    assert entries[-1]["target_name"] == "class_1" and "labels_sha256" not in entries[-1]["request"]
    assert entries[0]["request"]["key"] != entries[-1]["request"]["key"]
    again = invoke("grad-rollout", images, *common, "--labels", labels, "--class", "malignant")
    assert again.exit_code == 0 and "2 already complete" in said(again)
    # a misspelt name gets suggestions from the labels
    wrong = invoke("grad-rollout", images, *common, "--labels", labels, "--class", "malignent")
    assert wrong.exit_code == 2 and "Did you mean: 'malignant'?" in said(wrong)


def test_a_bad_label_file_is_one_line_exit_2(tmp_path, fine_tuned):
    checkpoint, labels, images = fine_tuned
    labels.write_text("a\nb\n")
    for command in (["rollout"], ["evaluate", "--methods", "rollout"]):
        result = invoke(command[0], images, *command[1:], "--model", "test_vit", "--checkpoint", checkpoint,
                        "--labels", labels, "-o", tmp_path / "out")
        assert result.exit_code == 2 and "names 2 classes; the model's head has 3" in said(result)
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_evaluate_speaks_the_labels(tmp_path, fine_tuned):
    checkpoint, labels, images = fine_tuned
    result = invoke("evaluate", images, "--model", "test_vit", "--checkpoint", checkpoint, "--labels", labels,
                    "-o", tmp_path / "e", "--methods", "rollout", "--metrics", "deletion", "--steps", 2, "-j", 0,
                    "--class", "normal")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "e" / "evaluation.jsonl").read_text().splitlines()]
    assert {line["target_name"] for line in lines if "method" in line} == {"normal"}
    assert all(line["predicted_name"] == NAMES[line["predicted"]] for line in lines)


def test_timm_label_sets_name_their_heads(tmp_path, save_test_vit):
    from vitexplain.models import class_synonyms_for

    assert class_synonyms_for(1000)[243] == ("bull mastiff",)
    assert class_synonyms_for(11821)[5] == ("food", "nutrient")  # ImageNet-12k, as timm's in12k heads
    assert class_synonyms_for(21843)[0][:2] == ("organism", "being")  # ImageNet-21k (Google's)
    assert class_synonyms_for(3) == (("class_0",), ("class_1",), ("class_2",))
    _, checkpoint = save_test_vit(num_classes=11821)
    write_image(tmp_path / "a.png", (32, 32))
    result = invoke("grad-rollout", tmp_path / "a.png", "--model", "test_vit", "--checkpoint", checkpoint,
                    "-o", tmp_path / "out", "--class", "nutrient")
    assert result.exit_code == 0, result.output
    assert [(e["target"], e["target_name"]) for e in read_manifest(tmp_path / "out")] == [(5, "food")]
