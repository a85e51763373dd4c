"""Scaling out: ``--shard K/N`` runs and ``--engine ray`` produce exactly what one local run does (byte-identical
files, the same manifest records), survive a killed worker, and refuse bad flags in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import invoke, said, write_image
from vitexplain.io.outputs import OutputError, OutputWriter, compact_manifest
from vitexplain.run.job import parse_shard, shard_of

ray = pytest.importorskip("ray", reason="the optional Ray engine is not installed")


@pytest.fixture
def inputs(tmp_path):
    """Seven pictures, two of them with the same stem in different folders."""
    for i in range(5):
        write_image(tmp_path / "in" / f"img{i}.png", (40 + 4 * i, 48), seed=i)
    write_image(tmp_path / "in" / "a" / "cat.png", (40, 40), seed=10)
    write_image(tmp_path / "in" / "b" / "cat.png", (44, 40), seed=11)
    return tmp_path / "in"


def outputs_of(out: Path) -> tuple[dict[str, bytes], list[str]]:
    """Every written file's bytes by name, and the manifest's records (all parts) as sorted canonical JSON, the
    output folder's path written OUT."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".npy", ".gif", ".jpg")}
    records = []
    for path in sorted(out.glob("manifest*.jsonl")):
        records += [json.dumps(json.loads(line), sort_keys=True).replace(str(out), "OUT")
                    for line in path.read_text().splitlines() if line]
    return files, sorted(records)


def run(args, out, *extra):
    result = invoke(*args, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def command(inputs, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=20)
    return ["grad-rollout", inputs, "--model", "test_vit", "--checkpoint", checkpoint, "-b", 2, "--save-raw", "-j", 0]


def test_three_shards_write_exactly_what_one_run_writes(command, tmp_path):
    run(command, tmp_path / "single")
    for k in (2, 3, 1):  # in any order
        result = run(command, tmp_path / "sharded", "--shard", f"{k}/3")
        assert f"manifest.shard-{k}-of-3.jsonl" in said(result)
    single, sharded = outputs_of(tmp_path / "single"), outputs_of(tmp_path / "sharded")
    assert sharded[0].keys() == single[0].keys() and len(single[0]) == 14  # 7 overlays, 7 raw masks
    assert sharded == single  # byte for byte, and the same records
    names = sorted(single[0])
    assert sum(name.startswith("cat_") and "-" in name.split("_")[-1] for name in names) == 4  # both cats hashed
    # each shard's part is read by every reader: a rerun of any shard, or of the whole, finds all done
    again = run(command, tmp_path / "sharded")
    assert "7 already complete" in said(again)
    assert invoke("compact", tmp_path / "sharded").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "sharded").glob("manifest*")) == ["manifest.jsonl"]
    assert outputs_of(tmp_path / "sharded") == single


def test_shards_split_the_batches_round_robin():
    paths = [Path(f"p{i}") for i in range(11)]
    shares = [shard_of(paths, (k, 3), 2) for k in (1, 2, 3)]
    assert [[p.name for p in share] for share in shares] == [
        ["p0", "p1", "p6", "p7"], ["p2", "p3", "p8", "p9"], ["p4", "p5", "p10"]]
    assert parse_shard(" 2/8") == (2, 8)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_part_writers_share_a_folder_and_a_plain_run_waits(tmp_path):
    first = OutputWriter(tmp_path, part="shard-1-of-2")
    second = OutputWriter(tmp_path, part="shard-2-of-2")
    with pytest.raises(OutputError, match="another vitexplain run"):
        OutputWriter(tmp_path)  # a plain run while shards write
    with pytest.raises(OutputError, match="another vitexplain run"):
        OutputWriter(tmp_path, part="shard-1-of-2")  # the same shard twice
    first.append_manifest({"input": "/x/a.png", "status": "failed", "error": "e", "request": {"key": "k"}})
    second.append_manifest({"input": "/x/b.png", "status": "failed", "error": "e", "request": {"key": "k"}})
    (tmp_path / "manifest.shard-2-of-2.jsonl").open("ab").write(b"\xff not a line\n")
    assert sorted(e["input"] for e in first.entries()) == ["/x/a.png", "/x/b.png"]
    with pytest.raises(OutputError):
        compact_manifest(tmp_path)  # refused while they write
    first.close(), second.close()
    assert compact_manifest(tmp_path) == 2
    lines = (tmp_path / "manifest.jsonl").read_bytes().splitlines()
    assert len(lines) == 3 and b"\xff not a line" in lines  # byte for byte: nothing dropped
    assert not list(tmp_path.glob("manifest.*.jsonl"))


@pytest.mark.parametrize("args, message", [
    (["--shard", "4/3"], "--shard K/N needs 1 <= K <= N"),
    (["--shard", "two"], "--shard takes K/N"),
    (["--ray-workers", 2], "--ray-workers applies to --engine ray"),
    (["--gpus-per-worker", 1], "--gpus-per-worker applies to --engine ray"),
    (["--engine", "ray", "--shard", "1/2"], "with --engine ray, Ray shares the work"),
    (["--engine", "ray", "--profile"], "--profile times one process"),
])
def test_bad_scale_out_flags_are_one_line_usage_errors(command, tmp_path, args, message):
    result = invoke(*command, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in said(result), result.output
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_a_missing_ray_says_how_to_install_it(command, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = invoke(*command, "-o", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2 and "pip install 'vitexplain[ray]'" in said(result)


@pytest.fixture(scope="module")
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_with_two_actors_writes_exactly_what_one_run_writes(local_ray, command, tmp_path, inputs):
    (inputs / "broken.png").write_bytes(b"not a png")
    # the local run with one thread, as each actor has (--cpus-per-worker 1): the backward pass's float sums
    # depend on the thread count
    single = subprocess.run([sys.executable, "-m", "vitexplain", *map(str, command), "-o", str(tmp_path / "single")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 1 and "broken.png" in single.stderr
    ray_run = invoke(*command, "-o", tmp_path / "ray", "--engine", "ray", "--ray-workers", 2)
    assert ray_run.exit_code == 1, ray_run.output
    assert "broken.png" in said(ray_run) and "1 failed" in said(ray_run)
    assert sorted(p.name for p in (tmp_path / "ray").glob("manifest*")) == ["manifest.jsonl"]  # parts folded
    single, on_ray = outputs_of(tmp_path / "single"), outputs_of(tmp_path / "ray")
    assert on_ray[0] == single[0] and len(single[0]) == 14
    assert on_ray[1] == single[1]  # the same records, the failure included


def test_a_killed_ray_worker_loses_at_most_its_batch_and_the_rerun_completes(tmp_path, save_test_vit):
    """A Ray run in a process of its own; one actor is killed (SIGKILL) once it has written an output."""
    for i in range(40):
        write_image(tmp_path / "in" / f"img{i:02d}.png", (40, 40), seed=i)
    _, checkpoint = save_test_vit()
    out = tmp_path / "out"
    args = [sys.executable, "-m", "vitexplain", "rollout", str(tmp_path / "in"), "--model", "test_vit", "--checkpoint",
            str(checkpoint), "-o", str(out), "-b", "1", "--engine", "ray", "--ray-workers", "2", "--save-raw"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "RAY_ADDRESS": ""})
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        for part in out.glob("manifest.ray-*.jsonl") if out.is_dir() else ():
            if part.name != "manifest.ray-driver.jsonl" and part.read_text().count("\n") >= 1:
                killed = int(part.name.split("-")[1])  # manifest.ray-{pid}-{id}.jsonl
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    process.communicate(timeout=300)
    assert killed is not None, "no worker wrote an output before the run ended"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert rerun.returncode == 0, rerun.stderr
    entries = OutputWriter(out).entries()
    ok = [e for e in entries if e["status"] == "ok"]
    assert sorted(Path(e["input"]).name for e in ok) == [f"img{i:02d}.png" for i in range(40)]  # once each
    assert all(Path(e["overlay"]).is_file() and Path(e["raw"]).is_file() for e in ok)
    assert sorted(p.name for p in out.glob("*.npy")) == [f"img{i:02d}_rollout_mean_d0.9.npy" for i in range(40)]


def test_ctrl_c_to_a_ray_driver_counts_what_the_manifests_hold_and_keeps_rays_messages_off_the_terminal(
        tmp_path, save_test_vit):
    for i in range(40):
        write_image(tmp_path / "in" / f"img{i:02d}.png", (40, 40), seed=i)
    _, checkpoint = save_test_vit()
    out = tmp_path / "out"
    args = [sys.executable, "-m", "vitexplain", "rollout", str(tmp_path / "in"), "--model", "test_vit", "--checkpoint",
            str(checkpoint), "-o", str(out), "-b", "1", "--engine", "ray", "--ray-workers", "2"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_ADDRESS": "", "COLUMNS": "250"})
    deadline = time.monotonic() + 200
    while process.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and sum(p.read_text().count("\n") for p in out.glob("manifest.ray-*.jsonl")) >= 6:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    output, _ = process.communicate(timeout=300)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 130, output
    recorded = len([e for e in OutputWriter(out, locked=False).entries() if e["status"] == "ok"])
    assert f"{recorded} images → {recorded} outputs" in output and recorded >= 6
    assert f"manifest: {out / 'manifest.jsonl'}" in " ".join(output.split()) and "ray-driver" not in output
    assert "core_worker" not in output and (out / "ray.log").is_file()  # Ray's own messages: in the log
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert rerun.returncode == 0, rerun.stderr
    assert len(OutputWriter(out, locked=False).entries()) == 40
