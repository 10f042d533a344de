"""Batched classification on the decode worker pool, and the pool surviving a decoder crash."""

import pytest

from model import checkpoint as ckpt
from model import decode
from model.decode import CRASHED, DecodePool
from model.inference import classify_batch, finish_batch, start_batch
from tests.conftest import image_bytes
from tests.crashing_decode import decode_or_die


@pytest.fixture(scope="module")
def pool():
    with DecodePool(2) as pool:
        yield pool


def test_batch_keeps_order_and_reports_unreadable_files(tmp_path, tiny_checkpoint, pool):
    checkpoint = ckpt.load(tiny_checkpoint)
    paths = []
    for i in range(9):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(image_bytes(colour=(20 * i, 100, 50)) if i != 4 else b"not an image")
        paths.append(path)
    outcomes = classify_batch(paths, checkpoint, pool)
    assert [o.path for o in outcomes] == paths
    assert [o.prediction is None for o in outcomes] == [i == 4 for i in range(9)]
    assert outcomes[4].error == "not an image (unrecognized format)" and outcomes[4].sha256
    one_by_one = [classify_batch([p], checkpoint, pool)[0].prediction for p in paths]
    assert [o.prediction.label if o.prediction else None for o in outcomes] == [p.label if p else None for p in one_by_one]


def test_a_file_that_kills_its_decoder_fails_alone(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(decode, "decode_files", decode_or_die)
    checkpoint = ckpt.load(tiny_checkpoint)
    names = ["a.jpg", "b.jpg", "crash.jpg", "c.jpg", "d.jpg", "e.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(image_bytes())
    with DecodePool(2) as pool:
        outcomes = classify_batch([tmp_path / n for n in names], checkpoint, pool)
        assert [o.error for o in outcomes] == [CRASHED if n == "crash.jpg" else None for n in names]
        # a batch started behind the one with the crash (as --once and the service do) is unharmed
        first = start_batch([tmp_path / n for n in names], checkpoint, pool)
        second = start_batch([tmp_path / "a.jpg", tmp_path / "b.jpg"], checkpoint, pool)
        assert [o.error for o in finish_batch(first, checkpoint, pool)] == [CRASHED if n == "crash.jpg" else None for n in names]
        assert all(o.prediction for o in finish_batch(second, checkpoint, pool))
