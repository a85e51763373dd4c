"""Nothing lost, nothing doubled: names that are not UTF-8, runs killed between an output's files and its manifest
line, the working directory, settings given twice, unusable evaluation lines, and brackets in help texts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke, read_manifest, said, write_image

LABEL = "rollout_mean_d0.9"


@pytest.fixture
def checkpoint(save_test_vit):
    return save_test_vit()[1]


@pytest.fixture
def folder(tmp_path):
    for index in range(4):
        write_image(tmp_path / "in" / f"img{index}.png", (32, 32), seed=index)
    return tmp_path / "in"


def run(folder, out, checkpoint, *extra):
    return invoke("rollout", folder, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out, "-b", "2", "-j", "0",
                  *extra)


def output_files(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if name.endswith(".png"))


def test_a_name_that_is_not_utf8_is_explained_and_recorded_losslessly(folder, tmp_path, checkpoint):
    latin1 = os.fsencode(folder) + b"/latin1_\xe9\xff.png"
    long_latin1 = os.fsencode(folder) + b"/" + b"\xe9" * 200 + b".png"  # shortened for the output name
    for index, raw in enumerate((latin1, long_latin1)):
        write_image(Path(os.fsdecode(raw)), (32, 32), seed=10 + index)
    out = tmp_path / "out"
    result = run(folder, out, checkpoint)
    assert result.exit_code == 0, result.output
    entries = read_manifest(out)
    assert len(entries) == 6 and all(e["status"] == "ok" for e in entries)
    by_input = {os.fsencode(e["input"]): e for e in entries}  # the manifest's surrogate escapes are the bytes
    assert latin1 in by_input and long_latin1 in by_input
    assert os.fsencode(by_input[latin1]["overlay"]) == os.fsencode(out) + b"/latin1_\xe9\xff_" + LABEL.encode() + b".png"
    assert os.path.isfile(by_input[long_latin1]["overlay"]) and len(os.fsencode(by_input[long_latin1]["name"])) < 200
    (out / "manifest.jsonl").read_bytes().decode("utf-8")  # JSON escapes the bytes: the manifest stays UTF-8
    again = run(folder, out, checkpoint)
    assert again.exit_code == 0 and len(read_manifest(out)) == 6 and "6 already complete" in said(again)
    # printed literally: a failing one says its name with the bytes escaped
    write_image(Path(os.fsdecode(os.fsencode(folder) + b"/bad_\xe9.png")), (32, 32))
    Path(os.fsdecode(os.fsencode(folder) + b"/bad_\xe9.png")).write_bytes(b"not an image")
    failed = run(folder, out, checkpoint)
    assert failed.exit_code == 1 and "bad_\\udce9.png" in said(failed)


def test_files_a_stopped_run_left_unlisted_are_rewritten_in_place_and_a_users_file_survives(folder, tmp_path, checkpoint,
                                                                                          monkeypatch):
    import vitexplain.io.outputs as outputs

    out = tmp_path / "out"
    out.mkdir()
    users = out / f"img3_{LABEL}.png"
    users.write_bytes(b"the user's own picture")
    # the disk fills up once two outputs are listed: the next outputs' files are written, their lines are not
    real, listed = outputs.OutputWriter.append_line, []

    def append_line(self, path, entry):
        if path == self.manifest_path:
            if len(listed) == 2:
                raise outputs.stop_for(OSError(28, os.strerror(28), str(path)), self.out_dir)
            listed.append(entry)
        return real(self, path, entry)

    monkeypatch.setattr(outputs.OutputWriter, "append_line", append_line)
    stopped = run(folder, out, checkpoint)
    assert stopped.exit_code == 1 and "no space left" in said(stopped)
    monkeypatch.undo()
    assert len(read_manifest(out)) == 2 and users.read_bytes() == b"the user's own picture"
    unlisted = set(output_files(out)) - {e["name"] + ".png" for e in read_manifest(out)} - {users.name}
    assert unlisted  # written, not listed
    stamps = {name: os.stat(out / name).st_mtime_ns for name in output_files(out)}
    rerun = run(folder, out, checkpoint)
    assert rerun.exit_code == 0, rerun.output
    entries = read_manifest(out)
    assert len(entries) == 4 and len({e["name"] for e in entries}) == 4
    assert output_files(out) == sorted({e["name"] + ".png" for e in entries} | {users.name})  # one file per output
    assert users.read_bytes() == b"the user's own picture"
    rewritten = {name for name in stamps if os.stat(out / name).st_mtime_ns != stamps[name]}
    assert unlisted <= rewritten and users.name not in rewritten  # in place, under the names they had
    assert not (out / ".manifest.claims.jsonl").exists()  # every claim is listed now


KILLER = """
import os, signal, sys
import vitexplain.io.outputs as outputs
real, calls = outputs.OutputWriter.append_manifest, []
def append(self, entry):
    calls.append(entry)
    if len(calls) == 3:  # the third output's files are written; its line never is
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, entry)
outputs.OutputWriter.append_manifest = append
from vitexplain.cli import main
sys.argv = ["vitexplain", *sys.argv[1:]]
main()
"""


def test_sigkill_between_an_outputs_files_and_its_line_then_rerun_leaves_one_file_per_output(tmp_path, checkpoint):
    folder = tmp_path / "in"
    for index in range(8):
        write_image(folder / f"img{index}.png", (32, 32), seed=index)
    out = tmp_path / "out"
    command = ["rollout", str(folder), "--model", "test_vit", "--checkpoint", str(checkpoint), "-o", str(out), "-b", "2",
               "-j", "0"]
    killed = subprocess.run([sys.executable, "-c", KILLER, *command], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and len(read_manifest(out)) == 2 and len(output_files(out)) >= 3
    rerun = subprocess.run([sys.executable, "-m", "vitexplain", *command], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    entries = read_manifest(out)
    assert sorted(e["name"] for e in entries) == [f"img{i}_{LABEL}" for i in range(8)]
    assert output_files(out) == [f"img{i}_{LABEL}.png" for i in range(8)]


def test_the_same_command_from_two_working_directories_computes_once(folder, tmp_path, checkpoint, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert run(folder, "../x", checkpoint).exit_code == 0
    monkeypatch.chdir(tmp_path)
    for out in ("x", tmp_path / "x"):
        again = run(folder, out, checkpoint)
        assert again.exit_code == 0 and "4 already complete" in said(again)
    entries = read_manifest(tmp_path / "x")
    assert len(entries) == 4 and all(os.path.isabs(e["overlay"]) for e in entries)
    # an older manifest, its paths relative to where it ran, still reads from anywhere
    old = [{**e, "overlay": os.path.join("elsewhere", "x", os.path.basename(e["overlay"]))} for e in entries]
    (tmp_path / "x" / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    again = run(folder, tmp_path / "x", checkpoint)
    assert again.exit_code == 0 and "4 already complete" in said(again) and len(read_manifest(tmp_path / "x")) == 4


def test_a_setting_given_twice_in_brackets_is_a_usage_error(folder, tmp_path, checkpoint):
    result = invoke("evaluate", folder, "--model", "test_vit", "--checkpoint", checkpoint, "-o", tmp_path / "e",
                    "--methods", "rollout[fusion=max,fusion=min]")
    assert result.exit_code == 2
    assert "--methods: rollout[fusion=max,fusion=min]: fusion is given twice" in said(result)
    assert not (tmp_path / "e").exists()


def test_an_evaluation_line_without_a_numeric_score_is_redone(folder, tmp_path, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=50)
    out = tmp_path / "e"
    args = ["evaluate", folder, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out, "--steps", 3, "-j", 0,
            "--methods", "rollout", "--metrics", "deletion,insertion"]
    assert invoke(*args).exit_code == 0
    path = out / "evaluation.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    broken = next(i for i, line in enumerate(lines) if line["request"]["kind"] == "perturbation")
    lines[broken]["deletion"] = "abc"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    again = invoke(*args)
    assert again.exit_code == 0
    text = said(again)
    assert text.count("deletion is not a number") == 1 and "1 image evaluated now" in text
    redone = json.loads((out / "summary.json").read_text())
    for before, after in zip(summary["methods"], redone["methods"]):
        for metric in ("deletion", "insertion"):
            assert after["metrics"][metric]["count"] == before["metrics"][metric]["count"] == 4
            assert after["metrics"][metric]["mean"] == pytest.approx(before["metrics"][metric]["mean"], rel=1e-5)


def test_every_help_text_shows_its_brackets():
    import click
    import typer

    from vitexplain.cli import app

    command = typer.main.get_command(app)
    checked = 0
    for name, sub in [(None, command), *command.commands.items()]:
        shown = " ".join(invoke(*([name] if name else []), "--help").output.split())
        shown = shown.replace("│", " ")
        shown = " ".join(shown.split())
        texts = [sub.help or ""] + [getattr(p, "help", None) or "" for p in sub.params]
        for text in texts:
            for plain in set(re.findall(r"\w*\[[^\]\s]*\]", click.unstyle(text).replace("\\[", "["))):
                assert plain in shown, f"{name or 'vitexplain'} --help lost {plain!r}"
                checked += 1
    assert checked >= 2  # --engine's vitexplain[ray] at least, on run commands


def test_a_checkpoint_with_pickled_code_is_refused_in_one_line(folder, tmp_path):
    import torch

    path = tmp_path / "pickled.pth"
    torch.save({"head.weight": torch.zeros(5, 192), "extra": Path("x")}, path)
    result = invoke("rollout", folder, "--model", "test_vit", "--checkpoint", path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in said(result) and "weights_only" in said(result)
    assert "safetensors" in said(result) and "\\n" not in result.output
