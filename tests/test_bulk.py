"""Bulk mode on Ray Data: the same answers as --once, the output's schema and placement, --resume,
an object store as source and output, and the faults a run survives."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from model import checkpoint as ckpt
from tests.conftest import ANSWER_EVERY_PICTURE, ROOT, SHARED_DATA, image_bytes, needs_shared_data
from tests.crashing_decode import decode_or_die
from watcher import config as configuration
from watcher import log

if importlib.util.find_spec("ray") is None:  # not imported here: watcher.bulk.engine sets Ray's environment first
    pytest.skip("bulk mode needs the ray extra: pip install -e '.[ray]'", allow_module_level=True)

import pyarrow as pa
import pyarrow.parquet as pq

from bench.harness import child_pids, descendant_pids
from watcher.bulk import engine
from watcher.bulk.output import SUMMARY, OutputFolder, RunSummary
from watcher.bulk.rows import SCHEMA, Classifier
from watcher.bulk.sources import SourceError
from watcher.once import classify_folder
from watcher.pipeline import decode_pool


@pytest.fixture(scope="module")
def ray_here():
    """One local Ray for the module's in-process runs, its temporary folder outside the home folder."""
    saved = dict(os.environ)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths must fit in 107 bytes
    log.setup("warning", "json")
    engine.start_ray(None, 128)
    yield
    engine.stop_ray()
    os.environ.clear()
    os.environ.update(saved)


def bulk_env(home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    return env | ({"HOME": str(home)} if home else {})


def make_config(folder: Path, given: dict) -> configuration.Config:
    path = folder / "bulk-config.yaml"
    path.write_text(json.dumps(given))  # JSON is YAML
    return configuration.load(path)


def answered_config(folder: Path, checkpoint: Path) -> configuration.Config:
    """The config of the generated (faceless) pictures: each answered whole."""
    return make_config(folder, {"checkpoint": str(checkpoint), "faces": {"no_face": "answer"}})


def read_rows(folder: Path) -> list[dict]:
    return [row for part in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def make_tree(root: Path, files: int) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i in range(files):
        folder = (root, root / "sub", root / "sub" / "deeper")[i % 3]
        (folder / f"{i:04d}.jpg").write_bytes(image_bytes((40 + i % 17, 50), (i * 7 % 256, 120, 90)))
    (root / "noise.jpg").write_bytes(os.urandom(3000))
    (root / ".partial.jpg").write_bytes(image_bytes())
    (root / ".hidden" / "x.jpg").write_bytes(image_bytes())
    (root / "link.jpg").symlink_to(root / "0000.jpg")
    os.mkfifo(root / "pipe.jpg")


def once_answers(folder: Path, config: configuration.Config, tmp_path: Path) -> dict[str, dict]:
    """--once's --details lines for `folder` and every folder below it, by path relative to it."""
    answers = {}
    with decode_pool(config) as pool:
        for sub in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and ".hidden" not in p.parts)]:
            details = tmp_path / "details.jsonl"
            classify_folder(sub, tmp_path / "once.json", config, pool, details=details)
            for line in map(json.loads, details.read_text().splitlines()):
                answers[str((sub / line["file"]).relative_to(folder))] = line
    return answers


def same_answers(rows: list[dict], once: dict[str, dict]) -> list[str]:
    """The paths whose bulk rows differ from --once's answer."""
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    differ = sorted(set(by_path) ^ set(once))
    for path in set(by_path) & set(once):
        line, mine = once[path], sorted(by_path[path], key=lambda r: -1 if r["face"] is None else r["face"])
        if "error" in line:
            good = len(mine) == 1 and mine[0]["error"] == line["error"] and mine[0]["face"] is None
        else:
            faces = [(f["label"], f["probability"], f["box"], f["how"]) for f in line["faces"]]
            good = faces == [
                (r["label"], r["probability"], [r["box_left"], r["box_top"], r["box_width"], r["box_height"]], r["how"])
                for r in mine
            ]
            good = good and all(r["sha256"] == line["sha256"] and r["checkpoint"] == line["checkpoint"] for r in mine)
        if not good:
            differ.append(path)
    return differ


def test_rows_equal_once_and_follow_the_inbox_rules(tmp_path, tiny_checkpoint, ray_here):
    source, out = tmp_path / "src", tmp_path / "out"
    make_tree(source, 60)
    config = answered_config(tmp_path, tiny_checkpoint)
    summary = engine.run(engine.BulkRun(str(source), str(out), config, tiny_checkpoint, workers=2, batch_size=8))
    rows = read_rows(out)
    expected = {f"{['', 'sub/', 'sub/deeper/'][i % 3]}{i:04d}.jpg" for i in range(60)} | {"noise.jpg", "link.jpg", "pipe.jpg"}
    assert {r["path"] for r in rows} == expected
    assert same_answers(rows, once_answers(source, config, tmp_path)) == []
    assert (summary.files, summary.answered, summary.failed) == (63, 60, 3)
    assert summary.failures == {
        "not an image (unrecognized format)": 1,
        "is a symbolic link": 1,
        "is a FIFO, not a regular file": 1,
    }
    written = json.loads((out / SUMMARY).read_text())
    assert (written["files"], written["failed"], written["runs"][0]["checkpoint"]) == (63, 3, ckpt.load(tiny_checkpoint).version)
    assert not list(tmp_path.glob("out.incomplete-*"))  # the staging folder became OUT


@needs_shared_data
@pytest.mark.slow
def test_rows_equal_once_on_every_development_set_with_the_shipped_model(tmp_path, ray_here):
    sets = SHARED_DATA / "other"
    config = make_config(tmp_path, {})
    engine.run(engine.BulkRun(str(sets), str(tmp_path / "out"), config, config.checkpoint))
    rows = read_rows(tmp_path / "out")
    once = once_answers(sets, config, tmp_path)
    assert len(once) >= 3000 and same_answers(rows, once) == []


def test_a_batch_where_every_file_failed_has_every_column(tmp_path, tiny_checkpoint, ray_here):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(5):
        (source / f"bad{i}.jpg").write_bytes(os.urandom(500))
    config = make_config(tmp_path, {"checkpoint": str(tiny_checkpoint)})
    for fmt in ("parquet", "jsonl"):
        out = tmp_path / f"out-{fmt}"
        engine.run(engine.BulkRun(str(source), str(out), config, tiny_checkpoint, fmt=fmt))
        if fmt == "parquet":
            (part,) = out.glob("part-*.parquet")
            table = pq.read_table(part)
            assert table.schema.equals(SCHEMA, check_metadata=False) and table.num_rows == 5
        else:
            (part,) = out.glob("part-*.jsonl")
            rows = [json.loads(line) for line in part.read_text().splitlines()]
            assert len(rows) == 5 and all(list(r) == SCHEMA.names and r["face"] is None and r["error"] for r in rows)


def test_an_empty_source_still_writes_the_schema(tmp_path, tiny_checkpoint, ray_here):
    (tmp_path / "src").mkdir()
    config = make_config(tmp_path, {"checkpoint": str(tiny_checkpoint)})
    summary = engine.run(engine.BulkRun(str(tmp_path / "src"), str(tmp_path / "out"), config, tiny_checkpoint))
    (part,) = (tmp_path / "out").glob("part-*.parquet")
    assert summary.files == 0 and pq.read_table(part).schema.equals(SCHEMA, check_metadata=False)


def test_a_file_whose_name_reads_as_another_files_fails_alone(tmp_path, tiny_checkpoint, ray_here):
    """A name not in UTF-8 (a raw 0xff byte) reads as the literal name backslash-x-f-f: the rows
    cannot tell the two apart, so the second fails with a reason and the run goes on."""
    source = tmp_path / "src"
    source.mkdir()
    for name in (b"\xff.jpg", b"\\xff.jpg", b"plain.jpg"):
        (source / os.fsdecode(name)).write_bytes(image_bytes())
    config = answered_config(tmp_path, tiny_checkpoint)
    summary = engine.run(engine.BulkRun(str(source), str(tmp_path / "out"), config, tiny_checkpoint))
    assert (summary.files, summary.answered, summary.failed) == (3, 2, 1)
    assert list(summary.failures.values()) == [1] and "reads the same" in next(iter(summary.failures))
    assert sorted(r["path"] for r in read_rows(tmp_path / "out")) == ["\\xff.jpg", "plain.jpg"]


def test_resume_classifies_only_the_files_not_in_the_output(tmp_path, tiny_checkpoint, ray_here):
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    for i in range(10):
        (source / f"{i}.jpg").write_bytes(image_bytes((40 + i, 50)))
    config = answered_config(tmp_path, tiny_checkpoint)
    job = engine.BulkRun(str(source), str(out), config, tiny_checkpoint)
    engine.run(job)
    with pytest.raises(SourceError, match="already holds output: pass --resume"):
        engine.run(job)
    with pytest.raises(SourceError, match="holds parquet parts; resume it with --format parquet"):
        engine.run(engine.BulkRun(str(source), str(out), config, tiny_checkpoint, fmt="jsonl", resume=True))
    for i in range(10, 15):
        (source / f"{i}.jpg").write_bytes(image_bytes((40 + i, 50)))
    again = engine.run(engine.BulkRun(str(source), str(out), config, tiny_checkpoint, resume=True))
    assert (again.files, again.skipped) == (5, 10)
    paths = [r["path"] for r in read_rows(out)]
    assert sorted(paths) == sorted(f"{i}.jpg" for i in range(15))
    written = json.loads((out / SUMMARY).read_text())
    assert written["files"] == 15 and [r["files"] for r in written["runs"]] == [10, 5]
    nothing = engine.run(engine.BulkRun(str(source), str(out), config, tiny_checkpoint, resume=True))
    assert nothing.files == 0 and len(list(out.glob("part-*"))) == 2  # no empty part added


def test_a_file_that_crashes_the_decoder_fails_alone(tmp_path, tiny_checkpoint):
    """The library class, as a user's own pipeline calls it: its decode processes die, not it."""
    for name in ("a.jpg", "crash.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(image_bytes())
    classifier = Classifier(ckpt.read_bytes(tiny_checkpoint), str(tmp_path), rules=ANSWER_EVERY_PICTURE, decode=decode_or_die)
    rows = classifier({"path": np.array(["a.jpg", "crash.jpg", "b.jpg"])}).to_pylist()
    assert [(r["path"], r["error"]) for r in rows] == [
        ("a.jpg", None),
        ("crash.jpg", "the decoder crashed on this file"),
        ("b.jpg", None),
    ]
    assert rows[0]["label"] in ("female", "male") and rows[2]["face"] == 0
    classifier.pool.close()


@pytest.fixture
def s3_server():
    moto = pytest.importorskip("moto.server", reason="the S3 test needs moto[server] (the dev extra)")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="photos")
    yield client, f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_an_object_store_as_source_and_output(tmp_path, tiny_checkpoint, s3_server):
    client, options = s3_server
    local = tmp_path / "src"
    local.mkdir()
    for i in range(12):
        data = image_bytes((40 + i, 50))
        (local / f"{i}.jpg").write_bytes(data)
        client.put_object(Bucket="photos", Key=f"in/{'deep/' if i % 2 else ''}{i}.jpg", Body=data)
        if i % 2:
            (local / "deep").mkdir(exist_ok=True)
            (local / f"{i}.jpg").rename(local / "deep" / f"{i}.jpg")
    client.put_object(Bucket="photos", Key="in/.hidden.jpg", Body=image_bytes())
    client.put_object(Bucket="photos", Key="in/huge.jpg", Body=image_bytes() + b"\0" * 3000)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        json.dumps({"checkpoint": str(tiny_checkpoint), "faces": {"no_face": "answer"}, "intake": {"max_file_bytes": 2500}})
    )
    args = [f"s3://photos/in{options}", f"s3://photos/out{options}", "--config", str(config_file), "--format", "jsonl"]
    home = tmp_path / "home"
    home.mkdir()
    top = subprocess.run(
        [sys.executable, "-m", "watcher.bulk", args[0], f"s3://photos{options}", "--config", str(config_file)],
        env=bulk_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert top.returncode == 2 and "cannot write the output beside it" in top.stderr, top.stderr  # before any file
    elsewhere = {"RAY_ADDRESS": "127.0.0.1:9"}  # another Ray's address: a run that starts its own does not go there
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.bulk", *args], env=bulk_env(home) | elsewhere, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr  # huge.jpg is over the byte limit
    assert list(home.iterdir()) == []  # nothing of Ray's in the home folder (no ~/.ray/auth_token)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="photos", Prefix="out")["Contents"]} - {"out/"}
    parts = {k for k in keys if k.startswith("out/part-") and k.endswith(".jsonl")}
    assert keys == {"out/_SUCCESS", *parts} and len(parts) == 1  # the staging prefix is gone
    rows = [
        json.loads(line)
        for key in keys
        if key.startswith("out/part-")
        for line in client.get_object(Bucket="photos", Key=key)["Body"].read().splitlines()
    ]
    assert {r["path"]: r["error"] for r in rows if r["error"]} == {"huge.jpg": "over the limit of 2500 bytes"}
    answered_here = once_answers(local, answered_config(tmp_path, tiny_checkpoint), tmp_path)
    assert same_answers([r for r in rows if r["path"] != "huge.jpg"], answered_here) == []


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_bulk_on_pictures(tmp_path: Path, checkpoint: Path, files: int, *options: str) -> subprocess.Popen:
    """python -m watcher.bulk on `files` generated PNG pictures (slow enough to catch at work)."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(files):
        (source / f"{i:05d}.png").write_bytes(image_bytes((300, 300), (i % 256, 90, 30), fmt="PNG"))
    config = {"checkpoint": str(checkpoint), "faces": {"no_face": "answer"}, "logging": {"format": "json"}}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    args = [str(source), str(tmp_path / "out"), "--config", str(tmp_path / "c.yaml"), "--batch-size", "4", *options]
    return subprocess.Popen(
        [sys.executable, "-m", "watcher.bulk", *args], env=bulk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def working_actor(proc: subprocess.Popen) -> int | None:
    """A classifier actor of the run whose decode process is up, if any."""
    return next((p for p in descendant_pids(proc.pid) if b"MapWorker" in command_line(p) and child_pids(p)), None)


def run_and_kill_a_worker(tmp_path: Path, checkpoint: Path, files: int) -> tuple[subprocess.CompletedProcess, bool]:
    """A bulk run with one of its two classifier actors SIGKILLed while it works."""
    proc = start_bulk_on_pictures(tmp_path, checkpoint, files, "--workers", "2")
    killed, deadline = False, time.monotonic() + 120
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        if (actor := working_actor(proc)) is not None:
            os.kill(actor, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), killed


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_and_doubles_nothing(tmp_path, tiny_checkpoint):
    proc, killed = run_and_kill_a_worker(tmp_path, tiny_checkpoint, 400)
    assert killed, "no classifier actor was found to kill"
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [r["path"] for r in read_rows(tmp_path / "out")]
    assert len(paths) == 400 and len(set(paths)) == 400


@pytest.mark.soak
@pytest.mark.parametrize("attempt", range(5))
def test_workers_killed_over_repeated_runs_lose_and_double_nothing(tmp_path, tiny_checkpoint, attempt):
    proc, killed = run_and_kill_a_worker(tmp_path, tiny_checkpoint, 1000)
    assert killed and proc.returncode == 0, proc.stderr[-3000:]
    paths = [r["path"] for r in read_rows(tmp_path / "out")]
    assert len(paths) == 1000 and len(set(paths)) == 1000


def bulk_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "watcher.bulk", *args], env=bulk_env(), capture_output=True, text=True, timeout=120
    )


def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_checkpoint):
    missing = bulk_cli(str(tmp_path / "nowhere"), str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint))
    assert missing.returncode == 2 and "nowhere: not found" in missing.stderr
    assert "not a readable" not in missing.stderr and missing.stderr.count("nowhere") == 1
    broken = tmp_path / "broken.pt"
    broken.write_text("not a checkpoint")
    (tmp_path / "src").mkdir()
    refused = bulk_cli(str(tmp_path / "src"), str(tmp_path / "out"), "--checkpoint", str(broken))
    assert refused.returncode == 2 and "broken.pt" in refused.stderr and "zip archive" in refused.stderr
    assert bulk_cli(str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "0").returncode == 2
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-earlier.parquet").write_bytes(b"")
    taken = bulk_cli(str(tmp_path / "src"), str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint))
    assert taken.returncode == 2 and "already holds output: pass --resume" in taken.stderr
    assert "ray" not in taken.stderr.lower().replace("already", "")  # refused before Ray was started
    (tmp_path / "a-file").write_text("")
    unwritable = bulk_cli(str(tmp_path / "src"), str(tmp_path / "a-file" / "out"), "--checkpoint", str(tiny_checkpoint))
    assert unwritable.returncode == 2 and "a-file/out: cannot write the output beside it" in unwritable.stderr
    assert "ray" not in unwritable.stderr.lower()


def test_the_output_folder_counts_only_output_and_names_a_part_it_cannot_resume_from(tmp_path):
    out = tmp_path / "out"
    (out / "lost+found").mkdir(parents=True)
    (out / ".DS_Store").write_bytes(b"\0")
    first = OutputFolder(str(out), "parquet", resume=False)  # nothing there is output
    assert not first.has_output
    first.abandon()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging folder made to check OUT is gone
    (out / "part-earlier.parquet").write_bytes(b"not parquet")
    (out / SUMMARY).write_text(json.dumps({"runs": [], "format": "parquet"}))
    with pytest.raises(SourceError, match=r"part-earlier\.parquet: cannot resume"):
        OutputFolder(str(out), "parquet", resume=True).done_paths()


def test_parts_without_a_summary_are_resumed_from(tmp_path):
    """As a run leaves OUT when it stops while moving its parts into an object store."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"path": ["a.jpg", "b/c.jpg"]}), out / "part-earlier-00000.parquet")
    with pytest.raises(SourceError, match="already holds output: pass --resume"):
        OutputFolder(str(out), "parquet", resume=False)
    with pytest.raises(SourceError, match="holds parquet parts; resume it with --format parquet"):
        OutputFolder(str(out), "jsonl", resume=True)
    resumed = OutputFolder(str(out), "parquet", resume=True)
    assert resumed.has_output and resumed.done_paths() == {"a.jpg", "b/c.jpg"} and resumed.previous_runs == []
    resumed.finish(RunSummary(resumed.run, "src", "v", "2026-12-08T00:00:00Z", skipped=2))
    assert json.loads((out / SUMMARY).read_text())["runs"][0]["skipped"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_ray_the_command_says_how_to_get_it(monkeypatch, capsys):
    from watcher.bulk import __main__ as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert cli.main(["src", "out"]) == 2
    assert "pip install 'gender-watcher[ray]'" in capsys.readouterr().err


def test_the_service_and_once_never_import_ray():
    code = (
        "import sys, watcher.__main__, watcher.service, watcher.once; sys.exit('ray' in sys.modules or 'pyarrow' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], env=bulk_env(), timeout=60).returncode == 0


@pytest.mark.slow
def test_sigterm_mid_run_leaves_the_output_as_it_was_and_no_ray_behind(tmp_path, tiny_checkpoint):
    proc = start_bulk_on_pictures(tmp_path, tiny_checkpoint, 300)
    deadline = time.monotonic() + 120
    while working_actor(proc) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no classifier actor was seen at work"
        time.sleep(0.2)
    ray_processes = descendant_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")][-1] == "stopped"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.incomplete-*"))
    time.sleep(1)
    assert [p for p in ray_processes if alive(p)] == []
