"""The reloader alone: a change that arrives while a load is running is still picked up; a
checkpoint whose canary pass fails is refused; the watch follows a swapped folder."""

import os
import threading
import time

import pytest
import torch

from model import checkpoint as ckpt
from tests.conftest import make_tiny_checkpoint
from watcher import log, reload
from watcher.reload import Reloader, load_checked, signature


def collect(reloader, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = reloader.collect()
        if result is not None:
            return result
        time.sleep(0.01)
    raise AssertionError("no load finished")


def test_change_during_a_load_is_loaded_next(tmp_path):
    path = tmp_path / "model.pt"
    first = make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))
    assert reloader.poll(force=True)  # a SIGHUP reload of the same file is under way
    second = make_tiny_checkpoint(tmp_path / "new.pt", seed=2)
    os.rename(tmp_path / "new.pt", path)  # ... and the file changes meanwhile
    assert not reloader.poll()  # busy: not started, but the change is remembered
    assert reloader.changing
    assert collect(reloader).version == first
    assert reloader.poll()  # held still since the last look: load it
    assert collect(reloader).version == second
    assert not reloader.changing


def test_a_file_replaced_between_the_load_and_the_reloader_is_loaded(tmp_path):
    path = tmp_path / "model.pt"
    first = make_tiny_checkpoint(path, seed=1)
    before = signature(path)  # as the service takes it, before loading
    serving = ckpt.load(path)
    make_tiny_checkpoint(tmp_path / "new.pt", seed=2)
    os.rename(tmp_path / "new.pt", path)  # while the decode processes start, say
    reloader = Reloader(path, "auto", serving, poll_seconds=30.0, loaded_signature=before)
    assert serving.version == first and reloader.changing  # looked at again soon, not in 30 s
    assert reloader.poll()
    assert collect(reloader).version != first


def test_a_file_refused_as_unreadable_is_tried_again_once_chmod_makes_it_readable(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))
    second = make_tiny_checkpoint(tmp_path / "new.pt", seed=2)
    os.rename(tmp_path / "new.pt", path)

    def unreadable(*args):  # as for a service user the file's mode shuts out (root reads anything)
        raise ckpt.CheckpointError(f"checkpoint {path}: cannot open: Permission denied")

    monkeypatch.setattr(reload, "load_checked", unreadable)
    assert not reloader.poll() and reloader.poll()
    assert isinstance(collect(reloader), ckpt.CheckpointError)
    assert not reloader.poll()  # refused: not tried again while nothing changes
    monkeypatch.undo()
    time.sleep(0.02)  # past the file system's timestamp granularity
    os.chmod(path, 0o644)
    assert not reloader.poll() and reloader.poll()  # changed, then held still
    assert collect(reloader).version == second


def test_damaged_file_is_refused_once_until_it_changes(tmp_path):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))
    path.write_bytes(b"garbage")
    assert not reloader.poll()  # first look: changed, not yet still
    assert reloader.poll()
    assert isinstance(collect(reloader), ckpt.CheckpointError)
    assert not reloader.poll() and not reloader.changing


def test_a_checkpoint_with_other_class_names_is_refused_while_serving(tmp_path):
    make_tiny_checkpoint(tmp_path / "a.pt")
    serving = ckpt.load(tmp_path / "a.pt")
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    torch.save(payload | {"class_names": ["woman", "man"]}, tmp_path / "b.pt")
    assert ckpt.load(tmp_path / "b.pt", "float32").class_names == ["woman", "man"]  # fine on its own
    with pytest.raises(ckpt.CheckpointError, match=r"b\.pt: class names .* differ from the serving model's"):
        load_checked(tmp_path / "b.pt", "float32", serving)


def test_the_watch_follows_a_swapped_checkpoint_folder(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    make_tiny_checkpoint(folder / "model.pt", seed=1)
    hints = []
    reloader = Reloader(folder / "model.pt", "auto", ckpt.load(folder / "model.pt"), wake=lambda: hints.append(1))
    reloader.start_watching()
    try:
        (tmp_path / "models.new").mkdir()
        second = make_tiny_checkpoint(tmp_path / "models.new" / "model.pt", seed=2)
        os.rename(folder, tmp_path / "models.old")  # a release-style swap of the whole folder
        os.rename(tmp_path / "models.new", folder)
        reloader.poll()  # notices the new folder and watches it from now on
        assert reloader.poll() and collect(reloader).version == second
        hints.clear()
        third = make_tiny_checkpoint(tmp_path / "next.pt", seed=3)
        os.rename(tmp_path / "next.pt", folder / "model.pt")
        deadline = time.monotonic() + 5
        while not hints and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hints, "no event from the new folder"
        reloader.poll()
        assert reloader.poll() and collect(reloader).version == third
    finally:
        reloader.stop_watching()


def test_a_watch_that_cannot_be_set_up_leaves_polling_to_retry(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))

    def no_watches(*args, **kwargs):
        raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(reload, "FolderWatch", no_watches)
    reloader.start_watching()  # logs the failure instead of stopping the service
    monkeypatch.undo()
    second = make_tiny_checkpoint(tmp_path / "new.pt", seed=2)
    os.rename(tmp_path / "new.pt", path)
    reloader.poll()  # watches now, and sees the change
    assert reloader.poll() and collect(reloader).version == second
    reloader.stop_watching()


def test_step_loads_a_changed_file_once_it_holds_still_and_says_when_to_be_asked_again(tmp_path):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path), poll_seconds=30.0)
    now = time.monotonic()
    assert reloader.step(now) == (None, pytest.approx(now + 30.0, abs=1.0))  # nothing due yet
    second = make_tiny_checkpoint(tmp_path / "new.pt", seed=2)
    os.rename(tmp_path / "new.pt", path)
    reloader.hinted = True  # as the folder watch does
    model, again = reloader.step(now)
    assert model is None and again == now + reload.RECHECK_SECONDS  # soon, not in 30 s
    deadline = time.monotonic() + 10
    while model is None and time.monotonic() < deadline:
        model, _ = reloader.step(max(again, time.monotonic()))
        time.sleep(0.01)
    assert model is not None and model.version == second


def test_step_on_sighup_for_a_missing_file_logs_the_refusal(tmp_path, capsys):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))
    path.unlink()
    log.setup("info", "json")
    assert reloader.step(time.monotonic(), sighup=True)[0] is None
    assert "reload_refused" in capsys.readouterr().err


def test_a_load_is_collected_as_soon_as_it_wakes_the_loop(tmp_path):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    woke, collected = threading.Event(), threading.Event()

    def wake():  # the load thread is still inside this call while the loop collects
        woke.set()
        collected.wait(10)

    reloader = Reloader(path, "auto", ckpt.load(path), wake=wake)
    assert reloader.poll(force=True)
    assert woke.wait(10)
    try:
        assert isinstance(reloader.collect(), ckpt.Checkpoint)
    finally:
        collected.set()


def test_a_missing_checkpoint_is_looked_for_at_the_slow_poll(tmp_path):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path), poll_seconds=30.0)
    path.unlink()
    due = time.monotonic() + 30.0
    _, ask_again = reloader.step(due)
    assert not reloader.changing and ask_again == pytest.approx(due + 30.0)


def test_a_watched_folder_gone_is_watched_anew_even_with_the_same_inode(tmp_path):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))
    reloader.start_watching()
    try:
        first = reloader._watch
        reloader._on_look_again(gone=True)  # as the watch reports IN_DELETE_SELF; the folder's identity is unchanged
        reloader.poll()
        assert reloader.hinted and reloader._watch is not None and reloader._watch is not first
    finally:
        reloader.stop_watching()
