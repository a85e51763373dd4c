"""Methods are plug-ins: a method in one file gets a subcommand, options, help, names and resume; the
registry checks declarations; the built-in methods declare what they are."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_image
from vitexplain.cli import build_app
from vitexplain.methods.base import Explainer, Param
from vitexplain.methods.registry import available_methods, get_method, register_method, unregister_method

runner = CliRunner()


@pytest.fixture
def toy():
    """The one-file plug-in ``tests/toy_method.py``, registered by importing it, and forgotten afterwards."""
    sys.modules.pop("toy_method", None)
    import toy_method

    yield toy_method
    unregister_method("toy-centre")


def test_a_method_in_one_file_gets_a_working_subcommand(tmp_path, toy, save_test_vit):
    _, checkpoint = save_test_vit()
    app = build_app()
    image = tmp_path / "in" / "x.png"
    write_image(image, (30, 50))
    out = tmp_path / "out"

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    common = ["toy-centre", image, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out, "--save-raw"]
    help_text = " ".join(invoke("toy-centre", "--help").output.split())
    assert "Gaussian bump" in help_text and "--width" in help_text and "Bump width in patches. [default: 2]" in help_text
    assert "--discard-ratio" not in help_text and "--fusion" not in help_text and "--class" not in help_text
    first = invoke(*common, "--width", "3")
    assert first.exit_code == 0, first.output
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["name"] == "x_toy-centre_w3" and entry["request"]["params"] == {"width": 3.0}
    assert entry["target"] is None
    np.testing.assert_allclose(np.load(entry["raw"]), toy.centre_bump((10, 10), 3.0).numpy(), rtol=1e-6)
    # by hand: the corner patch is 4.5 patches from the centre on both axes, the peak cells 0.5, width 3
    assert np.load(entry["raw"])[0, 0] == pytest.approx(np.exp(-(2 * 4.5 ** 2 - 2 * 0.5 ** 2) / 18), rel=1e-5)
    again = invoke(*common, "--width", "3")
    assert "1 already complete, skipped" in " ".join(again.output.split())
    other = invoke(*common)  # the default width: another request
    assert other.exit_code == 0 and "1 image → 1 output" in " ".join(other.output.split())
    bad = invoke(*common, "--width", "-1")
    assert bad.exit_code == 2 and "--width must be positive, got -1.0" in " ".join(bad.output.split())
    assert invoke(*common, "--discard-ratio", "0.5").exit_code == 2  # no such option
    sweep = invoke("sweep", image, "--method", "toy-centre")
    assert sweep.exit_code == 2 and "toy-centre has no discard ratio to sweep; sweep takes rollout, grad-rollout, flow" \
        in " ".join(sweep.output.split())


def test_builtin_methods_declare_their_capabilities():
    methods = available_methods()
    assert list(methods)[:4] == ["rollout", "grad-rollout", "flow", "grad-attention"]
    rollout, grad, flow = (methods[n] for n in ("rollout", "grad-rollout", "flow"))
    assert [p.name for p in rollout.params] == ["fusion", "discard_ratio"]
    assert [p.name for p in flow.params] == ["fusion", "discard_ratio", "solver"]
    assert grad.class_specific and grad.needs == {"attentions", "gradients"}
    assert not rollout.class_specific and rollout.needs == {"attentions"}
    assert all(m.sweepable() for m in (rollout, grad, flow)) and flow.stretch_overlay and not rollout.stretch_overlay


def test_the_registry_refuses_bad_declarations():
    class Base(Explainer):
        name, summary = "toy-bad", "a toy"

    cases = [
        (dict(name="Bad Name"), "lower-case words"),
        (dict(summary=""), "one-line summary"),
        (dict(class_specific=True), "needs gradients"),
        (dict(params=(Param("out", str, "x", "clashes"),)), "clashes with a common option"),
        (dict(params=(Param("w", float, -1.0, "width", check=lambda w: None if w > 0 else "must be positive"),)),
         "the default fails its own check"),
        (dict(needs=frozenset({"gradients"})), "needs must include 'attentions'"),
    ]
    for attributes, message in cases:
        method = type("Toy", (Base,), attributes)
        with pytest.raises(TypeError, match=message):
            register_method(method)
    with pytest.raises(TypeError, match="is AttentionRollout's"):
        register_method(type("Impostor", (Base,), {"name": "rollout"}))
    with pytest.raises(ValueError, match="unknown method 'rolout'.*Did you mean: rollout"):
        get_method("rolout")


def test_parameters_are_checked_and_taken_by_position_or_name():
    from vitexplain import AttentionRollout, load_model

    model = load_model("test_vit", pretrained=False)
    assert AttentionRollout(model, "max", 0.5).settings == {"fusion": "max", "discard_ratio": 0.5}
    assert AttentionRollout(model, discard_ratio=0.25).settings == {"fusion": "mean", "discard_ratio": 0.25}
    with pytest.raises(ValueError, match="fusion must be one of mean, max, min, got 'median'"):
        AttentionRollout(model, "median")
    with pytest.raises(TypeError, match="has no parameter 'solver'"):
        AttentionRollout(model, solver="dinic")
    with pytest.raises(TypeError, match="fusion given twice"):
        AttentionRollout(model, "max", fusion="min")
