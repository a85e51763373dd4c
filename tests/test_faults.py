"""Runs survive faults: one clear line per problem, every other input done, nothing lost, no traceback."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import SHARED, invoke, needs_shared, read_manifest as manifest, said as text, write_image
import vitexplain.io.outputs as outputs
import vitexplain.run.job as job
import vitexplain.run.pipeline as pipeline
from vitexplain.io.inputs import ImageDecodeError, load_image



@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    for index in range(6):
        write_image(images / f"img{index}.png", (48, 48), seed=index)
    return images


@pytest.fixture
def args(save_test_vit, tmp_path):
    _, checkpoint = save_test_vit()
    return ["--model", "test_vit", "--checkpoint", checkpoint, "-o", tmp_path / "out", "-b", "2"]


def failing_writes(monkeypatch, error: int, after: int = 0, only: str | None = None):
    """Make ``atomic_write`` raise ``OSError(error)`` for files whose name contains ``only`` (or after
    ``after`` files)."""
    real, calls = outputs.atomic_write, []

    def write(path, content):
        calls.append(path)
        if (only is not None and only in path.name) or (only is None and len(calls) > after):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, content)

    monkeypatch.setattr(outputs, "atomic_write", write)


def test_a_file_the_file_system_refuses_fails_alone_and_the_rerun_writes_it(folder, args, tmp_path, monkeypatch):
    failing_writes(monkeypatch, errno.ENAMETOOLONG, only="img2")
    result = invoke("rollout", folder, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "img2.png: cannot write img2_rollout_mean_d0.9.png: File name too long" in text(result)
    assert "5 images → 5 outputs" in text(result) and "1 failed" in text(result)
    monkeypatch.undo()
    rerun = invoke("rollout", folder, *args)
    assert rerun.exit_code == 0 and "1 image → 1 output" in text(rerun)
    assert sorted(e["name"] for e in manifest(tmp_path / "out") if e["status"] == "ok") == \
        [f"img{i}_rollout_mean_d0.9" for i in range(6)]


def test_a_very_long_file_name_gets_a_shortened_output_name(tmp_path, args):
    long = tmp_path / "long" / ("x" * 246 + ".png")  # a 250-byte name, as long as most file systems allow
    write_image(long, (32, 32))
    result = invoke("rollout", long, *args)
    assert result.exit_code == 0, result.output
    (entry,) = manifest(tmp_path / "out")
    assert len(entry["name"].encode()) <= outputs.MAX_NAME_BYTES and "~" in entry["name"]
    assert Path(entry["overlay"]).is_file()


@pytest.mark.parametrize("error, said", [(errno.ENOSPC, "no space left on"), (errno.EROFS, "read-only file system at")])
def test_a_disk_level_error_stops_cleanly_and_the_rerun_resumes(folder, args, tmp_path, monkeypatch, error, said):
    failing_writes(monkeypatch, error, after=2)
    result = invoke("rollout", folder, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"stopped: {said} {tmp_path / 'out'}" in text(result)
    assert "run the same command again to finish" in text(result)
    written = tmp_path / "out" / "manifest.jsonl"
    done = len(manifest(tmp_path / "out")) if written.exists() else 0  # writer threads race for the two writes
    assert done <= 2
    monkeypatch.undo()
    rerun = invoke("rollout", folder, *args)
    assert rerun.exit_code == 0 and f"{6 - done} images → {6 - done} outputs" in text(rerun), rerun.output
    assert len(manifest(tmp_path / "out")) == 6


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_really_full_disk_stops_the_run_and_the_rerun_finishes_once_there_is_room(folder, save_test_vit, tmp_path):
    _, checkpoint = save_test_vit()
    with tmpfs(tmp_path / "small", "48k") as out:
        common = ["rollout", folder, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out, "-b", "1",
                  "--save-raw"]
        result = invoke(*common)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"stopped: no space left on {out}" in text(result)
        first = len([e for e in manifest(out) if e["status"] == "ok"])
        assert 0 < first < 6
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        rerun = invoke(*common)
        assert rerun.exit_code == 0, rerun.output
        assert sorted(Path(e["input"]).name for e in manifest(out)) == [f"img{i}.png" for i in range(6)]
        assert not list(out.glob(".*.tmp"))


def test_a_read_only_output_folder_is_refused_up_front(folder, save_test_vit, tmp_path):
    _, checkpoint = save_test_vit()
    with tmpfs(tmp_path / "ro", "1m") as out:
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
        result = invoke("rollout", folder, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out)
        assert result.exit_code == 2 and "Read-only file system" in text(result) and "Traceback" not in result.output


@pytest.mark.parametrize("kind, message", [("folder", "is not a regular file"), ("fifo", "is not a regular file"),
                                           ("symlink", "is a symlink")])
def test_a_manifest_that_is_not_a_file_is_refused_up_front(folder, args, tmp_path, kind, message):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "manifest.jsonl"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        (tmp_path / "elsewhere.jsonl").write_text("")
        target.symlink_to(tmp_path / "elsewhere.jsonl")
    result = invoke("rollout", folder, *args)
    assert result.exit_code == 2 and message in text(result) and "Traceback" not in result.output


def test_small_shared_memory_decodes_in_the_main_process_and_says_so(folder, args, monkeypatch):
    import vitexplain.run.runtime as runtime

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))  # Docker's default
    workers = []
    real = pipeline.make_loader
    monkeypatch.setattr(pipeline, "make_loader", lambda *a: workers.append(a[3]) or real(*a))
    result = invoke("rollout", folder, *args, "-j", "2")
    assert result.exit_code == 0, result.output
    assert "note: only 64 MiB free in /dev/shm: decoding in the main process (-j 0)" in text(result)
    assert workers == [0]


def test_workers_are_capped_by_the_images_and_the_cores(folder, args, monkeypatch):
    workers = []
    real = pipeline.make_loader
    monkeypatch.setattr(pipeline, "make_loader", lambda *a: workers.append(a[3]) or real(*a))
    assert invoke("rollout", folder / "img0.png", folder / "img1.png", *args, "-j", "64").exit_code == 0
    assert workers == [min(1, os.cpu_count())]


def test_the_manifest_reader_skips_what_it_cannot_use_and_ends_a_cut_line(folder, args, tmp_path):
    out = tmp_path / "out"
    assert invoke("rollout", folder / "img0.png", *args).exit_code == 0
    (good,) = manifest(out)
    with open(out / "manifest.jsonl", "ab") as file:
        file.write(b"\xff\xfe not utf-8\n[1, 2]\n42\nnull\n" + json.dumps({"input": 5}).encode() + b"\n")
        file.write(json.dumps({**good, "overlay": 7}).encode() + b"\n")
        file.write(json.dumps(good)[:40].encode())  # a line cut short by a killed run
    result = invoke("rollout", folder, *args)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    said = text(result)
    for problem in ("not valid UTF-8", "not a JSON object", "no input or status", "wrong-typed output fields",
                    "not JSON (cut short?)"):
        assert problem in said, problem
    assert "1 already complete" in said and "5 images → 5 outputs" in said
    lines = (out / "manifest.jsonl").read_bytes().splitlines()
    assert lines[-6][:40] == json.dumps(good)[:40].encode() and len(lines[-6]) == 40  # ended, not glued
    assert all(json.loads(line)["status"] == "ok" for line in lines[-5:])


def test_names_are_printed_literally(tmp_path, args):
    folder = tmp_path / "x[/b]"
    write_image(folder / "good.png", (32, 32))
    (folder / "[bold]evil.png").write_text("not an image")
    (folder / "bad\nfailed: forged.png").write_text("not an image either")
    result = invoke("rollout", folder, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "[bold]evil.png: not an image" in result.output
    assert "bad\\nfailed: forged.png: not an image" in result.output
    assert sum(line.startswith("failed:") for line in result.output.splitlines()) == 2


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path, args):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("reading a FIFO blocked"))
    signal.alarm(10)
    try:
        for path in (fifo, Path("/dev/zero")):
            with pytest.raises(ImageDecodeError, match="not a regular file"):
                load_image(path)  # as if the file had been replaced after the folder was listed
        result = invoke("rollout", fifo, *args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code == 1 and "pipe.png: not a regular file" in text(result)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: os.mkfifo(p), "is not a regular file"),
])
def test_unusable_checkpoint_files_say_what_they_are(tmp_path, folder, make, message):
    path = tmp_path / "weights.pth"
    make(path)
    result = invoke("rollout", folder, "--model", "test_vit", "--checkpoint", path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in text(result), result.output


def test_a_checkpoint_of_other_shapes_names_the_keys_and_shapes(tmp_path, folder, save_test_vit):
    _, checkpoint = save_test_vit()  # test_vit: 160 px, 10×10 patches, width 192
    result = invoke("rollout", folder, "--model", "test_vit4", "--checkpoint", checkpoint, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    said = text(result)
    assert "the checkpoint does not fit 'test_vit4'" in said and " in the checkpoint, " in said and " in the model" in said


def test_safetensors_suffix_in_any_case_and_bad_pretrained_tags(tmp_path, folder, save_test_vit):
    from safetensors.torch import save_file

    model, _ = save_test_vit()
    path = tmp_path / "weights.SAFETENSORS"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert invoke("rollout", folder / "img0.png", "--model", "test_vit", "--checkpoint", path, "-o",
                  tmp_path / "out").exit_code == 0
    bogus = invoke("rollout", folder, "--model", "deit_tiny_patch16_224.bogus", "-o", tmp_path / "out")
    assert bogus.exit_code == 2
    assert "timm has no pretrained weights 'bogus' for 'deit_tiny_patch16_224'; its tags: fb_in1k" in text(bogus)


def test_orphan_temporary_files_are_removed_and_a_second_run_at_once_is_refused(folder, args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    orphan = out / ".img0_rollout_mean_d0.9.png.0123abcd.tmp"
    orphan.write_bytes(b"half a picture")
    assert invoke("rollout", folder / "img0.png", *args).exit_code == 0
    assert not orphan.exists()
    held = outputs.OutputWriter(out)  # as another run would
    try:
        result = invoke("rollout", folder, *args)
        assert result.exit_code == 2
        assert f"another vitexplain run (pid {os.getpid()}) is writing to" in text(result)
    finally:
        held.close()
    assert invoke("rollout", folder, *args).exit_code == 0  # released


def test_a_killed_dataloader_worker_stops_the_run_in_one_line_and_the_rerun_finishes(folder, args, tmp_path,
                                                                                     monkeypatch):
    from torch.utils.data import get_worker_info

    import vitexplain.run.loader as loader

    real = loader.ImageDataset.__getitem__

    def killed_at_four(self, index):
        if index == 4 and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, index)

    monkeypatch.setattr(loader.ImageDataset, "__getitem__", killed_at_four)
    result = invoke("rollout", folder, *args[:-2], "-b", "1", "-j", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "stopped: a DataLoader worker died" in text(result)
    monkeypatch.undo()
    rerun = invoke("rollout", folder, *args)
    assert rerun.exit_code == 0
    assert sorted(Path(e["input"]).name for e in manifest(tmp_path / "out")) == [f"img{i}.png" for i in range(6)]


def test_ctrl_c_while_starting_up_exits_130_without_a_traceback(folder, args, monkeypatch):
    def interrupted(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "build_model", interrupted)
    result = invoke("rollout", folder, *args)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "interrupted before any image was explained" in text(result)


def test_kernels_are_warmed_up_before_the_timed_run(tmp_path, save_test_vit):
    from vitexplain.io.outputs import OutputWriter
    from vitexplain.models import build_model, plan_model
    from vitexplain.run.request import Request

    _, checkpoint = save_test_vit()
    write_image(tmp_path / "a.png", (32, 32))
    plan = plan_model("test_vit", checkpoint=checkpoint)
    order = []

    @contextmanager
    def warming():
        order.append("compiling")
        yield
        order.append("compiled")

    real = pipeline.make_loader
    try:
        pipeline.make_loader = lambda *a: order.append("loader") or real(*a)
        pipeline.explain_paths(Request.create("rollout", plan), build_model(plan), [tmp_path / "a.png"],
                               OutputWriter(tmp_path / "out"), warming=warming)
    finally:
        pipeline.make_loader = real
    assert order == ["compiling", "compiled", "loader"]


@needs_shared
def test_the_header_says_which_weights_and_preprocessing_explain(tmp_path):
    """ViT-tiny's weights fit DeiT-tiny's shapes, but not its normalisation: the header and the manifest say so."""
    plane = SHARED / "images" / "plane.png"
    checkpoint = SHARED / "weights" / "vit_tiny_patch16_224.pth"
    result = invoke("rollout", plane, "--model", "deit_tiny_patch16_224", "--checkpoint", checkpoint, "-o",
                    tmp_path / "out")
    assert result.exit_code == 0
    said = text(result)
    assert f"on deit_tiny_patch16_224, checkpoint {checkpoint.resolve()}" in said.replace(str(SHARED), str(SHARED.resolve()))
    assert "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in said
    (entry,) = manifest(tmp_path / "out")
    assert entry["request"]["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert entry["request"]["model"]["checkpoint_sha256"].startswith("d94b1571")


def test_evaluate_on_a_full_disk_stops_and_the_rerun_finishes(folder, save_test_vit, tmp_path):
    _, checkpoint = save_test_vit()
    with tmpfs(tmp_path / "small", "16k") as out:
        common = ["evaluate", folder, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out, "-b", "1",
                  "--methods", "rollout", "--metrics", "deletion", "--steps", 2, "-j", 0]
        result = invoke(*common)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"no space left on {out}" in text(result)
        lines = []
        for line in (out / "evaluation.jsonl").read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # the line the full disk cut: the reader skips it
                pass
        assert 0 < len({e["input"] for e in lines if e["request"]["kind"] == "prediction"}) < 6
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        rerun = invoke(*common)
        assert rerun.exit_code == 0, rerun.output
        summary = json.loads((out / "summary.json").read_text())
        assert [row["metrics"]["deletion"]["count"] for row in summary["methods"]] == [6, 6]
