"""The reloader alone: a change that arrives while a load is running is still picked up."""

import os
import time

from model import checkpoint as ckpt
from tests.conftest import make_tiny_checkpoint
from watcher.reload import Reloader


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


def test_damaged_file_is_refused_once_until_it_changes(tmp_path):
    path = tmp_path / "model.pt"
    make_tiny_checkpoint(path, seed=1)
    reloader = Reloader(path, "auto", ckpt.load(path))
    path.write_bytes(b"garbage")
    assert not reloader.poll()  # first look: changed, not yet still
    assert reloader.poll()
    assert isinstance(collect(reloader), ckpt.CheckpointError)
    assert not reloader.poll() and not reloader.changing
