import os

import pytest

from watcher.moves import move_no_clobber, unique_name


def test_unique_name(tmp_path):
    assert unique_name(tmp_path, "a.jpg") == "a.jpg"
    (tmp_path / "a.jpg").write_text("x")
    assert unique_name(tmp_path, "a.jpg") == "a__2.jpg"
    assert unique_name(tmp_path, "a.jpg", {"a__2.jpg"}) == "a__3.jpg"
    (tmp_path / "noext").write_text("x")
    assert unique_name(tmp_path, "noext") == "noext__2"


def test_unique_name_stays_within_name_max(tmp_path):
    long = "é" * 120 + ".jpg"  # 244 bytes
    (tmp_path / long).write_text("x")
    other = unique_name(tmp_path, long)
    assert len(other.encode()) <= 255 and other.endswith("__2.jpg")
    (tmp_path / other).write_text("x")


def test_move_never_overwrites(tmp_path):
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        move_no_clobber(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "old"
    move_no_clobber(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "new" and not (tmp_path / "a").exists()


def test_moves_symlinks_and_fifos_themselves(tmp_path):
    os.symlink("/etc/passwd", tmp_path / "link.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    move_no_clobber(tmp_path / "link.jpg", tmp_path / "moved-link")
    move_no_clobber(tmp_path / "pipe.jpg", tmp_path / "moved-pipe")
    assert os.readlink(tmp_path / "moved-link") == "/etc/passwd"
