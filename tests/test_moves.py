import os

import pytest

from model.files import file_identity
from watcher import moves
from watcher.moves import COUNTED, move_no_clobber, unique_name
from watcher.startup import complete_moves


def test_unique_name(tmp_path):
    assert unique_name(tmp_path, "a.jpg") == "a.jpg"
    (tmp_path / "a.jpg").write_text("x")
    assert unique_name(tmp_path, "a.jpg") == "a__2.jpg"
    assert unique_name(tmp_path, "a.jpg", {"a__2.jpg"}) == "a__3.jpg"
    (tmp_path / "noext").write_text("x")
    assert unique_name(tmp_path, "noext") == "noext__2"


def test_a_name_repeated_past_the_counted_ones_costs_few_lookups(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_text("x")
    for n in range(2, COUNTED + 1):
        (tmp_path / f"a__{n}.jpg").write_text("x")
    looked = []
    real = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: looked.append(p) or real(p))
    other = unique_name(tmp_path, "a.jpg")
    assert not (tmp_path / other).exists() and other.startswith("a__") and other.endswith(".jpg")
    assert int(other[3:-4]) > COUNTED and len(looked) <= COUNTED + 2


def test_unique_name_stays_within_name_max(tmp_path):
    long = "é" * 120 + ".jpg"  # 244 bytes
    (tmp_path / long).write_text("x")
    other = unique_name(tmp_path, long)
    assert len(other.encode()) <= 255 and other.endswith("__2.jpg")
    (tmp_path / other).write_text("x")


def test_unique_name_with_a_long_extension(tmp_path):
    name = "a." + "x" * 253  # 255 bytes, nearly all extension
    (tmp_path / name).write_text("x")
    other = unique_name(tmp_path, name)
    assert len(other.encode()) <= 255 and other.endswith("__2")
    (tmp_path / other).write_text("x")


def test_unique_name_of_a_name_that_is_not_utf8(tmp_path):
    name = os.fsdecode(b"caf\xe9" * 60 + b".jpg")  # 244 bytes, not valid UTF-8
    (tmp_path / name).write_text("x")
    other = unique_name(tmp_path, name)
    assert len(os.fsencode(other)) <= 255 and other.endswith("__2.jpg")
    (tmp_path / other).write_text("x")


@pytest.mark.parametrize("kernel_refuses", [True, False], ids=["renameat2", "check-then-rename"])
def test_move_never_overwrites(tmp_path, monkeypatch, kernel_refuses):
    if not kernel_refuses:  # a C library or filesystem without RENAME_NOREPLACE
        monkeypatch.setattr(moves, "_renameat2", None)
    elif moves._renameat2 is None:
        pytest.skip("this C library has no renameat2")
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        move_no_clobber(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "old"
    move_no_clobber(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "new" and not (tmp_path / "a").exists()
    with pytest.raises(FileNotFoundError):  # what the pipeline tells a vanished file by
        move_no_clobber(tmp_path / "a", tmp_path / "d")


def test_moves_symlinks_and_fifos_themselves(tmp_path):
    os.symlink("/etc/passwd", tmp_path / "link.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    move_no_clobber(tmp_path / "link.jpg", tmp_path / "moved-link")
    move_no_clobber(tmp_path / "pipe.jpg", tmp_path / "moved-pipe")
    assert os.readlink(tmp_path / "moved-link") == "/etc/passwd"


def test_recovery_moves_only_the_file_the_journal_recorded(tmp_path):
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    done.mkdir()
    for name in ("same.jpg", "copied-back.jpg", "rewritten.jpg"):
        (inbox / name).write_bytes(b"recorded bytes")
    os.symlink("/etc/passwd", inbox / "link.jpg")
    os.mkfifo(inbox / "pipe.jpg")
    records = [
        {"source": str(inbox / n), "dest": str(done / n), "identity": list(file_identity(inbox / n))} for n in os.listdir(inbox)
    ]
    # the same bytes dropped again under the name, with the old times (cp -p, rsync -t)
    info = os.stat(inbox / "copied-back.jpg")
    (inbox / "copied-back.jpg").unlink()
    (inbox / "copied-back.jpg").write_bytes(b"recorded bytes")
    os.utime(inbox / "copied-back.jpg", ns=(info.st_atime_ns, info.st_mtime_ns))
    (inbox / "rewritten.jpg").write_bytes(b"other bytes, same size")
    assert complete_moves(records) == 3
    assert sorted(os.listdir(done)) == ["link.jpg", "pipe.jpg", "same.jpg"]
    assert sorted(os.listdir(inbox)) == ["copied-back.jpg", "rewritten.jpg"]  # left for intake to take as new files
