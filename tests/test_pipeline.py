"""The commit stage alone: files that change or vanish between reading and moving, decoders that
raise anything, and a decode slow enough to need the watchdog pinged meanwhile."""

import hashlib
import io
import os
import struct
import time

import pytest
import structlog
from PIL import Image

from bench.harness import write_config
from model import checkpoint as ckpt
from model import decode
from model.decode import decode_file
from model.pool import DecodePool
from tests.conftest import image_bytes, tiny_preprocessing
from watcher import config as configuration
from watcher import log, pipeline
from watcher.startup import open_store


@pytest.fixture
def stage(tmp_path, tiny_checkpoint):
    log.setup("warning", "json")
    config = configuration.load(write_config(tmp_path, tiny_checkpoint))
    model = ckpt.load(tiny_checkpoint, "float32")
    store = open_store(config)
    with DecodePool(1) as pool:
        yield config, model, store, pool
    store.close()


def test_a_file_replaced_while_classified_is_left_for_intake(stage):
    config, model, store, pool = stage
    photo, kept = config.inbox / "photo.jpg", config.inbox / "kept.jpg"
    photo.write_bytes(image_bytes(colour=(250, 250, 250)))
    kept.write_bytes(image_bytes())
    flow = pipeline.Pipeline(config, pool, store)
    pending = flow.start([photo, kept], model)
    pool.wait(pending)  # read and decoded; now an uploader renames a new photo over it
    new = image_bytes(colour=(0, 0, 255))
    (config.inbox / ".upload.part").write_bytes(new)
    os.rename(config.inbox / ".upload.part", photo)
    records = flow.commit(pending, model)
    assert [r["key"] for r in records] == ["kept.jpg"]  # no answer recorded for the new photo
    assert photo.read_bytes() == new and not (config.done / "photo.jpg").exists()


def test_a_file_deleted_before_its_move_does_not_stop_the_batch(stage):
    config, model, store, pool = stage
    gone, kept = config.inbox / "gone.jpg", config.inbox / "kept.jpg"
    gone.write_bytes(image_bytes())
    kept.write_bytes(image_bytes(colour=(0, 0, 0)))
    real_commit = store.commit

    def commit_then_delete(records, **options):
        real_commit(records, **options)  # durable now; the owner deletes the file before it is moved
        gone.unlink()

    store.commit = commit_then_delete
    records = pipeline.Pipeline(config, pool, store).process([gone, kept], model)
    assert {r["key"] for r in records} == {"gone.jpg", "kept.jpg"}
    assert os.listdir(config.done) == ["kept.jpg"]


def test_answers_are_logged_only_once_they_are_committed(stage):
    config, model, store, pool = stage
    log.setup("info", "json")
    photo, blank = config.inbox / "photo.jpg", config.inbox / "blank.jpg"
    photo.write_bytes(image_bytes())
    blank.write_bytes(b"not an image")

    def disk_full(_records, **_options):
        raise OSError(28, "No space left on device")

    store.commit, flow = disk_full, pipeline.Pipeline(config, pool, store)
    with structlog.testing.capture_logs() as logs, pytest.raises(OSError):
        flow.process([photo, blank], model)
    assert [e["event"] for e in logs] == []  # nothing claims an answer the journal does not hold
    del store.commit

    def results_file_unwritable(_labels):  # the journal append fitted, the results file's copy does not
        raise OSError(28, "No space left on device")

    store._add = results_file_unwritable
    with structlog.testing.capture_logs() as logs, pytest.raises(OSError):
        flow.process([photo, blank], model)
    assert sorted((e["event"], e["file"]) for e in logs if "file" in e) == [("answered", "photo.jpg"), ("failed", "blank.jpg")]


@pytest.mark.parametrize("intruder", ["folder", "symlink"])
def test_an_entry_swapped_in_before_the_move_never_reaches_done(stage, intruder):
    """An uploader swaps their own folder or symlink in under the photo's name once it is checked:
    what the rename moved is not the photo, so it goes back to the inbox (under a free name: here
    its own again)."""
    config, model, store, pool = stage
    photo = config.inbox / "photo.jpg"
    photo.write_bytes(image_bytes())
    real_commit = store.commit

    def commit_then_swap(records, **options):
        real_commit(records, **options)
        os.rename(photo, config.inbox / ".hidden.jpg")
        if intruder == "folder":
            photo.mkdir()
        else:
            photo.symlink_to("/etc/hostname")

    store.commit = commit_then_swap
    records = pipeline.Pipeline(config, pool, store).process([photo], model)
    assert [r["key"] for r in records] == ["photo.jpg"]
    assert os.listdir(config.done) == []
    assert sorted(os.listdir(config.inbox)) == [".hidden.jpg", "photo.jpg"]
    assert photo.is_dir() == (intruder == "folder") and photo.is_symlink() == (intruder == "symlink")


def test_an_entry_swapped_in_that_cannot_be_moved_does_not_stop_the_batch(stage, monkeypatch):
    """A folder of another user cannot be renamed into done/ (its '..' would change): PermissionError."""
    config, model, store, pool = stage
    photo, kept = config.inbox / "photo.jpg", config.inbox / "kept.jpg"
    photo.write_bytes(image_bytes())
    kept.write_bytes(image_bytes(colour=(0, 0, 0)))
    real_commit, real_move = store.commit, pipeline.move_no_clobber

    def commit_then_swap(records, **options):
        real_commit(records, **options)
        photo.unlink()
        photo.mkdir()

    def move(source, dest):
        if source.is_dir():
            raise PermissionError(13, "Permission denied")
        real_move(source, dest)

    store.commit = commit_then_swap
    monkeypatch.setattr(pipeline, "move_no_clobber", move)
    records = pipeline.Pipeline(config, pool, store).process([photo, kept], model)
    assert {r["key"] for r in records} == {"photo.jpg", "kept.jpg"}
    assert os.listdir(config.done) == ["kept.jpg"] and photo.is_dir()


def object_store_decode():
    """What a bulk run's worker runs per file of an object store, here reading local files."""
    fs = pytest.importorskip("pyarrow.fs", reason="bulk mode needs the ray extra: pip install -e '.[ray]'")
    from watcher.bulk.sources import RemoteDecode

    return RemoteDecode(fs.LocalFileSystem())


@pytest.mark.parametrize("decoder", [lambda: decode_file, object_store_decode], ids=["local", "object_store"])
def test_any_exception_while_decoding_fails_only_that_file(tmp_path, monkeypatch, decoder):
    unreadable, faulty, good = tmp_path / "unreadable.jpg", tmp_path / "faulty.jpg", tmp_path / "good.jpg"
    unreadable.write_bytes(image_bytes(colour=(1, 2, 3)))
    faulty.write_bytes(image_bytes((45, 50)))
    good.write_bytes(image_bytes())
    real_rgb, real_find = decode._to_rgb, decode.find_faces

    def damaged(img):  # what Pillow did with a real file whose Exif block is damaged
        if img.getpixel((0, 0))[0] < 10:
            raise struct.error("required argument is not an integer")
        return real_rgb(img)

    def fault(rgb, *args):  # a fault while looking for faces
        if rgb.shape[1] == 45:
            raise ZeroDivisionError("division by zero")
        return real_find(rgb, *args)

    monkeypatch.setattr(decode, "_to_rgb", damaged)
    monkeypatch.setattr(decode, "find_faces", fault)
    decode_one = decoder()
    results = [decode_one(p, tiny_preprocessing(), 10**6) for p in (unreadable, faulty, good)]
    assert results[0].faces is None and "not a readable image: struct.error" in results[0].error
    assert results[0].sha256 == hashlib.sha256(unreadable.read_bytes()).hexdigest()
    assert results[1].faces is None and results[1].error == "faces could not be looked for: ZeroDivisionError: division by zero"
    assert results[2].faces and results[2].error is None


def test_a_reader_that_raises_anything_fails_the_file_as_unreadable():
    def storage_error():
        raise ValueError("ArrowInvalid: bad object")

    result = decode.decode_read(storage_error, tiny_preprocessing())
    assert (result.faces, result.error, result.sha256) == (None, "cannot read: ValueError: ArrowInvalid: bad object", None)


def test_the_pool_calls_its_heartbeat_while_a_slow_batch_decodes(tmp_path):
    big = tmp_path / "big.png"
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 100, 50)).save(buffer, "PNG")  # small file, slow to decode
    big.write_bytes(buffer.getvalue())
    beats = []
    with DecodePool(1, heartbeat=lambda: beats.append(1), heartbeat_seconds=0.01) as pool:
        (result,) = pool.wait(pool.start([big], tiny_preprocessing()))
    assert result.faces and beats


def test_the_heartbeat_counts_across_waits(tmp_path):
    photos = []
    for i in range(6):
        photos.append(tmp_path / f"{i}.jpg")
        photos[-1].write_bytes(image_bytes(colour=(i * 40, 100, 100)))
    beats = []
    with DecodePool(1, heartbeat=lambda: beats.append(1), heartbeat_seconds=0.1) as pool:
        for path in photos:  # each wait far shorter than the interval, together longer
            time.sleep(0.03)
            pool.wait(pool.start([path], tiny_preprocessing()))
    assert beats


def test_a_picture_that_needs_more_memory_than_a_worker_may_use_fails_alone(tmp_path):
    big = tmp_path / "big.webp"
    buffer = io.BytesIO()
    Image.new("RGB", (4500, 4500), (200, 100, 50)).save(buffer, "WEBP", lossless=True)  # 20 MP, a few KB
    big.write_bytes(buffer.getvalue())
    small = tmp_path / "small.jpg"
    small.write_bytes(image_bytes())
    with DecodePool(1, memory_mb=250) as pool:
        assert pool.memory_limit_error is None
        first, second = pool.wait(pool.start([big, small], tiny_preprocessing()))
    assert first.error == "needs more memory to decode than a decode process may use (250 MB)"
    assert second.faces
