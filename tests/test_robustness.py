"""Uncurated folders: every bad input reported and recorded, good ones processed; checks before loading;
atomic outputs, resume after interruption, determinism."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from conftest import write_image
import vitexplain.cli as cli
import vitexplain.run.job as job
import vitexplain.io.inputs as data
from vitexplain.io.inputs import load_image, load_rgb
from vitexplain.io.codecs.png import SIGNATURE, chunk, rgb_header

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels (its data is one byte)."""
    return (SIGNATURE + chunk(b"IHDR", rgb_header(width, height)) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def exif_rotated_jpeg(path: Path) -> None:
    """A 40-wide, 20-high JPEG tagged 'rotate 90° clockwise to display' (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif.tobytes())


GOOD = ["good.png", "cmyk.jpg", "sixteen.png", "rgba.png", "palette.png", "gray.png", "one.png", "anim.gif", "exif.jpg"]
BAD = {  # file → what the failure line and the manifest must say
    "zero.png": "empty file (0 bytes)",
    "text.png": "not an image",
    "truncated.jpg": "corrupt or truncated",
    "truncated.png": "corrupt or truncated",
    "bomb.png": "refused as a possible decompression bomb",
    "noperm.png": "permission denied",
    "loop.png": "symlink loop",
}


@pytest.fixture
def uncurated(tmp_path, monkeypatch):
    """A folder mixing every kind of bad file with good images of unusual modes."""
    folder = tmp_path / "photos"
    write_image(folder / "good.png", (40, 60), seed=1)
    jpeg = folder / "full.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    png = folder / "full.png"
    write_image(png, (64, 64), seed=3)
    (folder / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    png.unlink()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture\n")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.array([[0, 32768], [65535, 256]], dtype=np.uint16)).save(folder / "sixteen.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.new("L", (20, 30), 77).save(folder / "gray.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "one.png")
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif_rotated_jpeg(folder / "exif.jpg")
    (folder / "bomb.png").write_bytes(png_claiming(20000, 20000))
    write_image(folder / "noperm.png", (10, 10))
    os.chmod(folder / "noperm.png", 0)
    if os.geteuid() == 0:  # root reads any file: make the read itself fail as it would for a user
        real_open = data.open_regular_file

        def open_as_user(path):
            if Path(path).name == "noperm.png":
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path)

        monkeypatch.setattr(data, "open_regular_file", open_as_user)
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("..", folder / "back")  # a folder loop: must not be followed
    (tmp_path / "empty").mkdir()
    return folder


def test_decoding_of_unusual_but_valid_images(uncurated):
    assert load_rgb(uncurated / "sixteen.png")[..., 0].tolist() == [[0, 128], [255, 1]]
    rgba = load_rgb(uncurated / "rgba.png")
    assert rgba[0, 0].tolist() == [255, 0, 0] and rgba[-1, -1].tolist() == [255, 255, 255]  # on white
    assert load_rgb(uncurated / "anim.gif")[5, 5].tolist() == [255, 0, 0]  # first frame
    assert load_rgb(uncurated / "exif.jpg").shape == (40, 20, 3)  # orientation honoured
    assert load_rgb(uncurated / "cmyk.jpg").shape == (20, 30, 3)
    assert load_rgb(uncurated / "gray.png")[0, 0].tolist() == [77, 77, 77]
    assert load_rgb(uncurated / "one.png").shape == (1, 1, 3)


def test_decoded_pixels_match_a_plain_pillow_decode(uncurated):
    for name in ("exif.jpg", "cmyk.jpg", "gray.png", "anim.gif", "one.png"):
        with Image.open(uncurated / name) as image:
            reference = np.array(ImageOps.exif_transpose(image).convert("RGB"))
        assert np.array_equal(load_rgb(uncurated / name), reference), name
        assert load_image(uncurated / name).mode == "RGB"
    assert load_rgb(uncurated / "gray.png").flags.writeable  # the public array is the caller's to change


def test_every_bad_input_is_reported_recorded_and_the_rest_processed(tmp_path, uncurated, save_test_vit):
    _, checkpoint = save_test_vit()
    out = tmp_path / "out"
    missing = tmp_path / "missing"
    result = invoke("rollout", uncurated, tmp_path / "empty", missing, "--model", "test_vit",
                    "--checkpoint", checkpoint, "-o", out, "--batch-size", "3", "--save-raw")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    entries = manifest(out)
    failed = {Path(e["input"]).name: e["error"] for e in entries if e["status"] == "failed"}
    expected_failures = {**BAD, "empty": "folder contains no images", "missing": "does not exist"}
    assert set(failed) == set(expected_failures)
    for name, reason in expected_failures.items():
        assert reason in failed[name], (name, failed[name])
        shown = text.replace(str(uncurated) + "/", "").replace(str(tmp_path) + "/", "")
        assert f"{name}: {reason}" in shown, (shown[shown.find(name) - 5:shown.find(name) + 60])
    done = {Path(e["input"]).name: e for e in entries if e["status"] == "ok"}
    assert sorted(done) == sorted(GOOD)
    for name, entry in done.items():
        assert iio.imread(entry["overlay"]).shape[:2] == load_rgb(uncurated / name).shape[:2]
        assert np.load(entry["raw"]).shape == (10, 10)
    assert f"{len(GOOD)} images → {len(GOOD)} outputs" in text and f"{len(expected_failures)} failed" in text


def test_bad_options_fail_before_any_weights_are_loaded(tmp_path, monkeypatch, save_test_vit):
    monkeypatch.setattr(job, "build_model", lambda *a, **k: pytest.fail("weights loaded before options were checked"))
    _, checkpoint = save_test_vit(num_classes=5)
    image = tmp_path / "a.png"
    write_image(image)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = ["-o", tmp_path / "out"]
    cases = [
        (["rollout", image, "--discard-ratio", "1", *out], "--discard-ratio must be in [0, 1), got 1.0"),
        (["rollout", image, "--discard-ratio", "-0.5", *out], "--discard-ratio must be in [0, 1)"),
        (["rollout", image, "--fusion", "median", *out], "'median' is not one of 'mean', 'max', 'min'"),
        (["grad-rollout", image, "--class", "1000", *out], "class index 1000 is out of range: the model has classes 0..999"),
        (["grad-rollout", image, "--class", "7", "--model", "test_vit", "--checkpoint", checkpoint, *out],
         "out of range: the model has classes 0..4"),
        (["grad-rollout", image, "--class", "tigr cat", *out], "unknown class name 'tigr cat'. Did you mean: 'tiger cat'"),
        (["rollout", image, "--model", "deit_tiny_patch16", *out], "unknown timm model 'deit_tiny_patch16'. Did you mean:"),
        (["rollout", image, "--model", "resnet18", *out], "'resnet18' has no ViT attention blocks"),
        (["rollout", image, "-o", blocker / "sub"], "cannot write to"),
        (["rollout", image, "--checkpoint", tmp_path / "nope.pth", *out], "does not exist"),
        (["rollout", image, "--model", "test_vit2", "--checkpoint", checkpoint, *out], "does not fit 'test_vit2'"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output


@pytest.fixture
def twelve_images(tmp_path):
    folder = tmp_path / "twelve"
    for i in range(12):
        write_image(folder / f"img{i:02d}.png", (48, 48), seed=i)
    return folder


def count_explained(monkeypatch) -> list[int]:
    """Patch the explainers to count the images they explain."""
    from vitexplain.methods.base import Explainer

    counted = []
    original = Explainer.explain
    monkeypatch.setattr("vitexplain.run.pipeline.warm_up", lambda *args: None)  # count the images only

    def counting(self, images, *args, **kwargs):
        counted.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Explainer, "explain", counting)
    return counted


def test_interrupted_run_resumes_without_recomputing(tmp_path, twelve_images, save_test_vit, monkeypatch):
    _, checkpoint = save_test_vit()
    out = tmp_path / "out"
    args = ["rollout", twelve_images, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out, "-b", "1",
            "--save-raw"]
    real_loader = cli_pipeline_loader = __import__("vitexplain.run.pipeline", fromlist=["make_loader"])
    original_make_loader = real_loader.make_loader

    def interrupted_after_five(*a, **k):
        for index, batch in enumerate(original_make_loader(*a, **k)):
            if index == 5:
                raise KeyboardInterrupt  # Ctrl-C while the 6th image is being read
            yield batch

    monkeypatch.setattr(cli_pipeline_loader, "make_loader", interrupted_after_five)
    first = invoke(*args)
    assert first.exit_code == 130, first.output
    assert "interrupted:" in first.output and "run the same command again to finish" in " ".join(first.output.split())
    done_first = {e["input"]: e for e in manifest(out)}
    assert len(done_first) == 5
    stamps = {e["overlay"]: os.stat(e["overlay"]).st_mtime_ns for e in done_first.values()}

    monkeypatch.setattr(cli_pipeline_loader, "make_loader", original_make_loader)
    counted = count_explained(monkeypatch)
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert sum(counted) == 7  # only the rest was computed
    assert "5 already complete, skipped" in " ".join(second.output.split())
    entries = manifest(out)
    assert sorted(Path(e["input"]).name for e in entries) == sorted(p.name for p in twelve_images.iterdir())
    assert all(os.stat(path).st_mtime_ns == stamp for path, stamp in stamps.items())  # not rewritten
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 12 and not list(out.glob(".*.tmp"))
    for picture in pictures:
        assert iio.imread(picture).shape == (48, 48, 3)  # every file decodes whole
    third = invoke(*args)
    assert third.exit_code == 0 and sum(counted) == 7 and "12 already complete" in " ".join(third.output.split())
    overwrite = invoke(*args, "--overwrite")
    assert overwrite.exit_code == 0 and sum(counted) == 19
    assert len(manifest(out)) == 12  # one line per output, old lines replaced


def test_ctrl_c_stops_between_batches_and_a_second_one_at_once(tmp_path, twelve_images, save_test_vit,
                                                             monkeypatch):
    """A SIGINT that arrives while a batch is read or explained stops the run before the next batch: the
    batch being explained is finished and recorded, one being read is not explained. Two stop at once."""
    _, checkpoint = save_test_vit()
    import vitexplain.run.pipeline as pipeline
    from vitexplain.methods.base import Explainer

    original_make_loader, original_explain = pipeline.make_loader, Explainer.explain
    monkeypatch.setattr(pipeline, "warm_up", lambda *args: None)  # count the images only
    signals_while_reading: dict[int, int] = {}
    signals_while_explaining: dict[int, int] = {}

    def loader(*a, **k):
        for index, batch in enumerate(original_make_loader(*a, **k)):
            for _ in range(signals_while_reading.get(index, 0)):
                signal.raise_signal(signal.SIGINT)
            yield batch

    def explain(self, images, *args, **kwargs):
        explained.append(len(images))
        for _ in range(signals_while_explaining.get(len(explained) - 1, 0)):
            signal.raise_signal(signal.SIGINT)
        return original_explain(self, images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "make_loader", loader)
    monkeypatch.setattr(Explainer, "explain", explain)
    # (SIGINTs while reading, SIGINTs while explaining, batches whose explanation began, outputs recorded)
    cases = [({3: 1}, {}, 3, 3), ({}, {3: 1}, 4, 4), ({3: 2}, {}, 3, 3), ({}, {3: 2}, 4, 3)]
    for run, (reading, explaining, begun, recorded) in enumerate(cases):
        signals_while_reading.clear(), signals_while_reading.update(reading)
        signals_while_explaining.clear(), signals_while_explaining.update(explaining)
        explained: list[int] = []
        handler_before = signal.getsignal(signal.SIGINT)
        out = tmp_path / f"out{run}"
        result = invoke("rollout", twelve_images, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out,
                        "-b", "1")
        assert result.exit_code == 130, (run, result.output)
        assert len(manifest(out)) == recorded and len(list(out.glob("*.png"))) == recorded, run
        assert len(explained) == begun, run  # a second SIGINT stops even the batch being explained
        assert result.output.count("stopping after this batch (Ctrl-C again to stop now)") == 1, run
        assert f"interrupted: {recorded} images → {recorded} outputs" in result.output, run
        assert signal.getsignal(signal.SIGINT) is handler_before  # restored


def test_stop_requests_outside_the_main_thread_install_nothing():
    from vitexplain.run.interrupts import StopRequests

    handler_before, seen = signal.getsignal(signal.SIGINT), []

    def in_thread():
        with StopRequests() as stop:
            seen.append((signal.getsignal(signal.SIGINT), stop.requested))

    worker = threading.Thread(target=in_thread)
    worker.start(), worker.join()
    assert seen == [(handler_before, False)]


def test_loader_workers_ignore_sigint(twelve_images):
    """A terminal's Ctrl-C reaches the workers too: they go on, and leave stopping to the main process."""
    from vitexplain.models import Preprocessing

    paths = sorted(twelve_images.iterdir())
    prep = Preprocessing(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from vitexplain.run.loader import make_loader

    batches = iter(make_loader(paths, prep, 2, 2, False))
    read = list(next(batches).paths) + list(next(batches).paths)  # one batch from each worker: both have started
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    read += [path for batch in batches for path in batch.paths]
    assert read == paths


@pytest.mark.parametrize("whole_group", [False, True], ids=["main-process", "process-group-like-a-terminal"])
def test_real_ctrl_c_in_a_subprocess_then_rerun_finishes(tmp_path, twelve_images, save_test_vit, whole_group):
    _, checkpoint = save_test_vit()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vitexplain", "rollout", str(twelve_images), "--model", "test_vit",
               "--checkpoint", str(checkpoint), "-o", str(out), "-b", "1", "--num-workers", "2"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=whole_group)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "manifest.jsonl").is_file() and len((out / "manifest.jsonl").read_text().splitlines()) >= 2:
            if whole_group:
                os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: workers get it too
            else:
                process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=120)
    if "done:" in stderr:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 130, stderr
    assert "interrupted:" in stderr and "Traceback" not in stderr
    first = len(manifest(out))
    assert 2 <= first < 12
    rerun = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    entries = manifest(out)
    assert len(entries) == 12 and len({e["overlay"] for e in entries}) == 12
    for entry in entries:
        assert iio.imread(entry["overlay"]).shape == (48, 48, 3)


def test_same_command_twice_gives_identical_raw_masks(tmp_path, twelve_images, save_test_vit):
    _, checkpoint = save_test_vit()
    for run, workers in (("a", "0"), ("b", "2")):
        result = invoke("grad-rollout", twelve_images, "--model", "test_vit", "--checkpoint", checkpoint,
                        "-o", tmp_path / run, "--save-raw", "-b", "5", "-j", workers)
        assert result.exit_code == 0, result.output
    raws = sorted((tmp_path / "a").glob("*.npy"))
    assert len(raws) == 12
    for raw in raws:
        assert raw.read_bytes() == (tmp_path / "b" / raw.name).read_bytes()
