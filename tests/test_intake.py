import os
import struct
import time

import pytest
import structlog.testing

from watcher import intake as intake_module
from watcher import log
from watcher.inotify import (
    CHANGED,
    CLOSED,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    OPENED,
    parse_events,
)
from watcher.intake import UNCLOSED_SETTLE, Intake, is_waiting_name


def test_waiting_names():
    for name in (".x.jpg", "a.part", "a.tmp", "a.jpg~", "a.jpg.crdownload", "a.partial"):
        assert is_waiting_name(name)
    assert not is_waiting_name("a.jpg")


def test_closed_hint_is_ready_at_once(tmp_path):
    intake = Intake(tmp_path, settle=5)
    (tmp_path / "a.jpg").write_bytes(b"x")
    intake.hint({"a.jpg": CLOSED})
    assert intake.take() == [tmp_path / "a.jpg"]
    assert intake.take() == []  # handed out once


def test_rescan_waits_for_settled_size_and_mtime(tmp_path):
    intake = Intake(tmp_path, settle=1.0)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    intake.rescan()
    now = time.time()
    assert intake.take(now) == [] and intake.waiting()
    assert intake.take(now + 0.5) == []
    with open(path, "ab") as f:  # still being written: the clock starts again
        f.write(b"more")
    assert intake.take(now + 1.2) == []
    assert intake.take(now + 2.5) == [path]


def test_old_files_found_by_rescan(tmp_path):
    intake = Intake(tmp_path, settle=1.0)
    path = tmp_path / "old.jpg"
    path.write_bytes(b"x")
    os.utime(path, (time.time() - 100, time.time() - 100))
    intake.rescan()
    now = time.time()
    intake.take(now)
    assert intake.take(now + 1.0) == [path]


def test_a_file_with_an_mtime_in_the_future_is_taken_once_settled(tmp_path):
    intake = Intake(tmp_path, settle=1.0)
    path = tmp_path / "camera.jpg"
    path.write_bytes(b"x")
    os.utime(path, (time.time() + 3600, time.time() + 3600))  # a camera's clock an hour ahead
    intake.rescan()
    now = time.monotonic()
    assert intake.take(now) == []
    assert intake.take(now + 1.1) == [path]


def test_waiting_names_folders_and_specials(tmp_path):
    intake = Intake(tmp_path, settle=0)
    (tmp_path / "a.part").write_bytes(b"x")
    (tmp_path / ".b.jpg").write_bytes(b"x")
    (tmp_path / "dir.jpg").mkdir()
    os.symlink("/etc/passwd", tmp_path / "link.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    intake.rescan()
    now = time.time()
    first = intake.take(now)
    assert set(first) == {tmp_path / "link.jpg", tmp_path / "fifo.jpg"}  # never opened, quarantined later
    assert intake.take(now + 1) == []


def test_name_in_pipeline_is_looked_at_after_release(tmp_path):
    intake = Intake(tmp_path, settle=5)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")
    intake.hint({"a.jpg": CLOSED})
    assert intake.take() == [path]
    intake.hint({"a.jpg": CLOSED})  # same name dropped again while the first is in the pipeline
    assert intake.take() == []
    intake.release([path])
    assert intake.take() == [path]


def test_a_file_left_in_the_inbox_after_its_batch_is_taken_again_once_settled(tmp_path):
    intake = Intake(tmp_path, settle=1.0)
    path, gone = tmp_path / "a.jpg", tmp_path / "b.jpg"
    path.write_bytes(b"x")
    gone.write_bytes(b"y")
    intake.hint({"a.jpg": CLOSED, "b.jpg": CLOSED})
    now = time.monotonic()
    assert intake.take(now) == [path, gone]
    os.chmod(path, 0o600)  # changed while classified, without an event: its answer is not kept
    gone.unlink()  # moved out by the batch
    intake.release([path, gone])
    assert intake.take(now) == []  # settling first, as any file found by a listing
    assert intake.take(now + 1.5) == [path]
    assert not intake.waiting()


def test_a_file_created_under_the_watch_waits_for_its_writer_to_close_it(tmp_path):
    intake = Intake(tmp_path, settle=1.0)
    path = tmp_path / "a.jpg"
    path.write_bytes(b"half")
    intake.hint({"a.jpg": OPENED})
    now = time.monotonic()
    assert intake.take(now) == [] and intake.take(now + 30) == []  # a writer paused long after settle
    intake.hint({"a.jpg": CHANGED})  # a listing meanwhile does not make it settle sooner
    assert intake.take(now + 31) == []
    intake.hint({"a.jpg": CLOSED})
    assert intake.take(now + 32) == [path]


def test_a_file_created_and_never_closed_is_taken_after_a_longer_settle(tmp_path):
    intake = Intake(tmp_path, settle=1.0)
    path = tmp_path / "linked.jpg"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jpg"
    outside.write_bytes(b"x")
    os.link(outside, path)  # a hard link is created with no close event
    intake.hint({"linked.jpg": OPENED})
    now = time.monotonic()
    intake.take(now)
    assert intake.take(now + UNCLOSED_SETTLE - 1) == []
    assert intake.take(now + UNCLOSED_SETTLE + 1) == [path]


def test_a_paused_writer_is_waited_for_through_the_watch(tmp_path):
    intake = Intake(tmp_path, settle=0.2, watch=True)
    intake.rescan()
    try:
        with open(tmp_path / "slow.jpg", "wb") as f:
            f.write(b"half")
            f.flush()
            deadline = time.monotonic() + 1.0  # five times settle, the file still open
            while time.monotonic() < deadline:
                assert intake.take() == []
                time.sleep(0.05)
            f.write(b"rest")
        deadline = time.monotonic() + 5
        while not (got := intake.take()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [tmp_path / "slow.jpg"]
    finally:
        intake.stop()


def test_inotify_events_wake_and_hint(tmp_path):
    woken = []
    intake = Intake(tmp_path, settle=5, watch=True, wake=lambda: woken.append(1))
    intake.rescan()
    try:
        (tmp_path / "a.jpg").write_bytes(b"x")  # create, write, close
        (tmp_path / "b.part").write_bytes(b"x")
        os.rename(tmp_path / "b.part", tmp_path / "b.jpg")  # renamed into place
        outside = tmp_path.parent / f"{tmp_path.name}-outside.jpg"
        outside.write_bytes(b"x")
        os.rename(outside, tmp_path / "c.jpg")  # renamed in from an unwatched folder
        deadline = time.time() + 5
        got = []
        while time.time() < deadline and len(got) < 3:
            got += intake.take()  # settle is 5 s: all three come from events, at once
            time.sleep(0.05)
        assert sorted(got) == [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"] and woken
    finally:
        intake.stop()


def event(mask, name=b""):
    padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))  # the kernel pads names with NULs
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


def test_parse_events():
    data = (
        event(IN_CREATE, b"a.jpg")
        + event(IN_CLOSE_WRITE, b"a.jpg")  # created and written in one read: closed
        + event(IN_CREATE, "b\u00e9.jpg".encode())
        + event(IN_MOVED_TO, b"c.jpg")
        + event(IN_CLOSE_WRITE, b"c.jpg")
        + event(IN_CREATE | IN_ISDIR, b"sub")
    )
    assert parse_events(data) == ({"a.jpg": CLOSED, "b\u00e9.jpg": OPENED, "c.jpg": CLOSED}, False, False)
    assert parse_events(event(IN_Q_OVERFLOW) + event(IN_MOVED_TO, b"d.jpg")) == ({"d.jpg": CLOSED}, True, False)
    assert parse_events(event(IN_DELETE_SELF) + event(IN_IGNORED)) == ({}, True, True)  # the folder itself is gone


def test_a_gone_folder_is_watched_anew_even_when_its_successor_has_the_same_inode(tmp_path):
    intake = Intake(tmp_path, 0.0, watch=True)
    try:
        intake.rescan()
        first = intake._watch
        intake.look_again(gone=True)  # as the watch reports IN_DELETE_SELF; the folder's identity is unchanged
        intake.rescan()
        assert intake._watch is not None and intake._watch is not first
    finally:
        intake.stop()


@pytest.fixture
def info_logs():
    """Info lines reach capture_logs whatever level an earlier test set up."""
    log.setup("info", "json")


@pytest.mark.usefixtures("info_logs")
def test_a_watch_that_cannot_be_set_up_leaves_the_listings_to_find_files(tmp_path, monkeypatch):
    def no_watch(*_args):
        raise OSError(28, "inotify_add_watch: No space left on device")

    monkeypatch.setattr(intake_module, "FolderWatch", no_watch)
    intake = Intake(tmp_path, 0.0, watch=True)
    (tmp_path / "a.jpg").write_bytes(b"x")
    with structlog.testing.capture_logs() as logs:
        intake.rescan()
        intake.rescan()  # tries again, says nothing more
    assert [e["event"] for e in logs] == ["inbox_watch_failed"] and "No space left" in logs[0]["reason"]
    intake.take()
    assert intake.take() == [tmp_path / "a.jpg"]
    monkeypatch.undo()  # watches can be had again
    try:
        with structlog.testing.capture_logs() as logs:
            intake.rescan()
        assert intake._watch is not None and logs == []
    finally:
        intake.stop()


@pytest.mark.usefixtures("info_logs")
def test_an_inbox_that_cannot_be_listed_is_waited_for_and_said_once(tmp_path, monkeypatch):
    intake = Intake(tmp_path, 0.0)
    (tmp_path / "a.jpg").write_bytes(b"x")
    real_scandir = os.scandir

    def refused(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(intake_module.os, "scandir", refused)
    with structlog.testing.capture_logs() as logs:
        intake.rescan()
        intake.rescan()
    assert [e["event"] for e in logs] == ["inbox_unreadable"] and intake.missing
    monkeypatch.setattr(intake_module.os, "scandir", real_scandir)
    with structlog.testing.capture_logs() as logs:
        intake.rescan()
    assert [e["event"] for e in logs] == ["inbox_back"] and not intake.missing
    intake.take()
    assert intake.take() == [tmp_path / "a.jpg"]


@pytest.mark.usefixtures("info_logs")
def test_a_folder_that_cannot_be_served_is_not_listed_until_it_can(tmp_path):
    problems = ["'done' is on another filesystem than 'inbox'"]
    intake = Intake(tmp_path, 0.0, problem=lambda: problems[0] if problems else None)
    (tmp_path / "a.jpg").write_bytes(b"x")
    with structlog.testing.capture_logs() as logs:
        intake.rescan()
        intake.rescan()
    assert [(e["event"], e["reason"]) for e in logs] == [("inbox_unusable", problems[0])]
    assert intake.missing and intake.take() == []
    problems.clear()  # the problem is mended: the same folder is asked again and served
    intake.rescan()
    intake.take()
    assert not intake.missing and intake.take() == [tmp_path / "a.jpg"]
