"""`python -m watcher --once DIR`: output format, exit codes, and DIR left untouched."""

import fcntl
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bench.harness import write_config
from tests.conftest import SHARED_DATA, image_bytes, needs_shared_data, run_cli, strictly_valid
from train.photos import background, compose
from watcher import config as configuration
from watcher.once import _settled
from watcher.startup import LOCK_NAME, StartupError, instance_lock


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def config_for(tmp_path, checkpoint, **settings):
    """A config for the generated (faceless) test images: every picture answered whole unless `faces` is given."""
    path = tmp_path / "c.yaml"
    given = {"checkpoint": str(checkpoint), "logging": {"format": "json"}, "faces": {"no_face": "answer"}, **settings}
    path.write_text(yaml.safe_dump(given))
    return path


@needs_shared_data
def test_details_list_every_face_and_a_picture_without_one_fails(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    faces = [Image.open(p) for p in sorted((SHARED_DATA / "other" / "lfw" / "female").glob("*.jpg"))[:2]]
    two, _ = compose(faces, random.Random(0))
    two.save(photos / "two.jpg", quality=92)
    background((1600, 1200), random.Random(1)).save(photos / "nobody.jpg", quality=92)
    out, details = tmp_path / "res.json", tmp_path / "details.jsonl"
    config = config_for(tmp_path, tiny_checkpoint, faces={"no_face": "fail"})
    proc = run_cli("--once", str(photos), "--output", str(out), "--details", str(details), "--config", str(config))
    assert proc.returncode == 1, proc.stderr
    lines = {line["file"]: line for line in map(json.loads, details.read_text().splitlines())}
    assert lines["nobody.jpg"]["error"] == "no face found" and "faces" not in lines["nobody.jpg"]
    found = lines["two.jpg"]["faces"]
    assert len(found) == 2 and all(set(f) == {"box", "score", "how", "label", "probability"} for f in found)
    assert lines["two.jpg"]["label"] == found[0]["label"] and lines["two.jpg"]["checkpoint"]
    assert found[0]["box"][2] * found[0]["box"][3] >= found[1]["box"][2] * found[1]["box"][3]  # the main face first
    assert json.loads(out.read_text()) == {"two.jpg": found[0]["label"]}
    failures = [r for r in map(json.loads, proc.stderr.splitlines()) if r.get("event") == "failed"]
    assert [(f["file"], f["reason"]) for f in failures] == [("nobody.jpg", "no face found")]


def test_all_classified_exit_0(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(70):  # 9 batches of 8: more than --once keeps in flight
        (photos / f"{i:06d}.jpg").write_bytes(image_bytes(colour=(i * 3, 100, 200 - i)))
    (photos / "x.png").write_bytes(image_bytes(fmt="PNG"))
    (photos / ".hidden.jpg").write_bytes(b"ignored")
    (photos / "sub").mkdir()
    before = snapshot(photos)
    out = tmp_path / "res.json"
    config = config_for(tmp_path, tiny_checkpoint, batch={"max_size": 8})
    proc = run_cli("--once", str(photos), "--output", str(out), "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert sorted(results) == sorted([f"{i:06d}.jpg" for i in range(70)] + ["x.png"])
    assert set(results.values()) <= {"female", "male"}
    assert snapshot(photos) == before


def test_unreadable_files_are_reported_and_exit_1(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "good.jpg").write_bytes(image_bytes())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (photos / "notes.txt").write_text("text")
    out = tmp_path / "res.json"
    proc = run_cli("--once", str(photos), "--output", str(out), "--config", str(config_for(tmp_path, tiny_checkpoint)))
    assert proc.returncode == 1
    assert list(json.loads(out.read_text())) == ["good.jpg"]
    failures = [r for r in map(json.loads, proc.stderr.splitlines()) if r["event"] == "failed"]
    assert {f["file"] for f in failures} == {"broken.jpg", "notes.txt"}
    assert all(f["reason"] for f in failures)


def test_a_name_that_is_not_utf8_is_answered_in_valid_utf8(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / os.fsdecode(b"caf\xe9.jpg")).write_bytes(image_bytes())
    out, details = tmp_path / "res.json", tmp_path / "details.jsonl"
    config = config_for(tmp_path, tiny_checkpoint)
    proc = run_cli("--once", str(photos), "--output", str(out), "--details", str(details), "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert list(strictly_valid(out.read_bytes())) == ["caf\\xe9.jpg"]
    assert strictly_valid(details.read_bytes())["file"] == "caf\\xe9.jpg"


def test_move_pass_takes_a_name_that_is_not_utf8(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, tiny_checkpoint, intake={"settle_seconds": 0.0})
    name = os.fsdecode(b"caf\xe9.jpg")
    (tmp_path / "inbox" / name).write_bytes(image_bytes())
    (tmp_path / "inbox" / "ok.jpg").write_bytes(image_bytes())
    proc = run_cli("--config", str(config), "--once", str(tmp_path / "inbox"), "--move")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "done")) == sorted([name, "ok.jpg"])
    records = [strictly_valid(line) for line in (tmp_path / "results" / "journal.jsonl").read_bytes().splitlines()]
    exact = [bytes.fromhex(r["dest_hex"]) if "dest_hex" in r else os.fsencode(r["dest"]) for r in records]
    assert sorted(exact) == sorted(os.fsencode(tmp_path / "done" / n) for n in (name, "ok.jpg"))
    assert set(strictly_valid((tmp_path / "results" / "process_results.json").read_bytes())) == {"caf\\xe9.jpg", "ok.jpg"}
    assert [strictly_valid(line.encode()) for line in proc.stderr.splitlines() if line.startswith("{")]


def test_two_names_that_read_the_same_keep_two_answers(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, tiny_checkpoint, intake={"settle_seconds": 0.0})
    (tmp_path / "inbox" / "a\\xff.jpg").write_bytes(image_bytes())  # a backslash, x, f, f
    (tmp_path / "inbox" / os.fsdecode(b"a\xff.jpg")).write_bytes(image_bytes((50, 40)))  # the byte 0xff
    proc = run_cli("--config", str(config), "--once", str(tmp_path / "inbox"), "--move")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "results" / "process_results.json").read_text()
    assert sorted(json.loads(text)) == ["a\\xff.jpg", "a\\xff__2.jpg"] and text.count('": "') == 2
    answered = [json.loads(line) for line in proc.stderr.splitlines() if '"answered"' in line]
    assert sorted(Path(e["moved_to"]).name for e in answered) == sorted(json.loads(text))  # the log names the key


def test_move_pass_keeps_an_uploaders_symlink_from_reaching_the_journal(tmp_path, tiny_checkpoint):
    """The lock file lives beside the journal: a planted `.gender-watcher.lock` in the inbox (where
    earlier versions kept it) pointing at the journal is an ordinary hidden name, opened by nobody."""
    config = write_config(tmp_path, tiny_checkpoint, intake={"settle_seconds": 0.0})
    (tmp_path / "inbox" / "a.jpg").write_bytes(image_bytes())
    assert run_cli("--config", str(config), "--once", str(tmp_path / "inbox"), "--move").returncode == 0
    journal = tmp_path / "results" / "journal.jsonl"
    before = journal.read_bytes()
    os.symlink(journal, tmp_path / "inbox" / ".gender-watcher.lock")
    assert run_cli("--config", str(config), "--once", str(tmp_path / "inbox"), "--move").returncode == 0
    assert journal.read_bytes() == before


def test_the_lock_holds_against_a_second_taker_and_names_the_first(tmp_path, tiny_checkpoint):
    config = configuration.load(write_config(tmp_path, tiny_checkpoint))
    taken_twice = pytest.raises(StartupError, match=f"another gender-watcher \\(pid {os.getpid()}\\) is working")
    with instance_lock(config), taken_twice, instance_lock(config):
        pass
    with instance_lock(config):  # released
        pass


def test_an_uploader_holding_a_lock_on_the_inbox_does_not_keep_the_pass_out(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, tiny_checkpoint, intake={"settle_seconds": 0.0})
    (tmp_path / "inbox" / "a.jpg").write_bytes(image_bytes())
    fd = os.open(tmp_path / "inbox", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_cli("--config", str(config), "--once", str(tmp_path / "inbox"), "--move").returncode == 0
    finally:
        os.close(fd)
    assert os.listdir(tmp_path / "done") == ["a.jpg"]


def test_a_lock_file_replaced_by_a_symlink_is_refused(tmp_path, tiny_checkpoint):
    config = configuration.load(write_config(tmp_path, tiny_checkpoint))
    (tmp_path / "elsewhere").write_text("keep me")
    (config.journal.parent / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StartupError, match="cannot open the lock file"), instance_lock(config):
        pass
    assert (tmp_path / "elsewhere").read_text() == "keep me"


def test_a_file_gone_since_the_listing_is_not_settled(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert _settled(tmp_path / "a.jpg", time.time() + 10, 1.0)
    assert not _settled(tmp_path / "a.jpg", time.time(), 5.0)
    assert not _settled(tmp_path / "gone.jpg", time.time(), 1.0)


def test_default_output_is_process_results_json_in_the_current_folder(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(image_bytes())
    proc = run_cli("--once", str(photos), "--config", str(config_for(tmp_path, tiny_checkpoint)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads((tmp_path / "process_results.json").read_text())) == ["a.jpg"]


def test_once_on_the_current_folder_skips_its_own_results_and_details_files(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(image_bytes())
    config = str(config_for(tmp_path, tiny_checkpoint))
    for _ in range(2):  # the second pass finds its own two files in the folder: not inputs
        proc = run_cli("--once", ".", "--details", "faces.jsonl", "--config", config, cwd=photos)
        assert proc.returncode == 0, proc.stderr
    assert list(json.loads((photos / "process_results.json").read_text())) == ["a.jpg"]
    assert [json.loads(line)["file"] for line in (photos / "faces.jsonl").read_text().splitlines()] == ["a.jpg"]


def test_usage_and_config_errors_exit_2(tmp_path, tiny_checkpoint):
    assert run_cli("--once", str(tmp_path / "missing")).returncode == 2
    assert run_cli("--bogus").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch: {max_size: lots}\n")
    proc = run_cli("--once", str(tmp_path), "--config", str(bad))
    assert proc.returncode == 2 and "batch.max_size" in proc.stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    proc = run_cli("--once", str(tmp_path), "--config", str(config_for(tmp_path, broken)))
    assert proc.returncode == 2 and proc.stderr.count("broken.pt") == 1, proc.stderr  # said once, not twice
    proc = run_cli("--once", str(tmp_path), "--details", str(tmp_path / "no" / "d.jsonl"))
    assert proc.returncode == 2 and f"the folder {tmp_path / 'no'} does not exist" in proc.stderr  # before any file
    proc = run_cli("--once", str(tmp_path), "--output", str(tmp_path))
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "it is a folder" in proc.stderr
    proc = run_cli("--once", str(tmp_path), "--move", "--output", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "--output is for --once alone" in proc.stderr
    for option in ("--output", "--details"):  # refused, not ignored while the service starts
        proc = run_cli(option, str(tmp_path / "r.json"))
        assert proc.returncode == 2 and f"{option} goes with --once" in proc.stderr


def test_a_folder_that_cannot_be_read_exits_2(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    from watcher import __main__ as cli

    photos = tmp_path / "photos"
    photos.mkdir()
    monkeypatch.setattr(cli.os, "access", lambda path, mode: path != photos)  # as for a user without read permission
    assert cli.main(["--once", str(photos), "--config", str(config_for(tmp_path, tiny_checkpoint))]) == 2
    assert f"cannot read the folder {photos}" in capsys.readouterr().err


def test_an_unexpected_error_is_logged_with_its_traceback(tmp_path, tiny_checkpoint, monkeypatch, capfd):
    from watcher import __main__ as cli
    from watcher import once

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(once, "classify_folder", fail)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--once", str(tmp_path), "--config", str(config_for(tmp_path, tiny_checkpoint))]) == 3
    fatal = [json.loads(line) for line in capfd.readouterr().err.splitlines() if '"fatal"' in line]
    assert fatal and fatal[0]["reason"] == "OSError: [Errno 28] No space left on device"
    assert "Traceback" in fatal[0]["exception"] and "in fail" in fatal[0]["exception"]


def installed() -> bool:
    try:
        importlib.metadata.distribution("gender-watcher")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not installed(), reason="gender-watcher is not installed here (make installs it)")
def test_python_m_watcher_works_from_a_folder_holding_a_model_folder(tmp_path):
    for name in ("model", "train", "watcher", "photos"):
        (tmp_path / name).mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it: the installed package
    proc = subprocess.run(
        [sys.executable, "-m", "watcher", "--once", "photos"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
