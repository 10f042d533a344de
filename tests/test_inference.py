"""Batched classification on the decode worker pool, and the pool surviving a decoder crash."""

import time

import pytest
import torch
from torch import nn

from model import checkpoint as ckpt
from model.inference import (
    classify_batch,
    classify_in_batches,
    finish_batch,
    mirror_averaged_logits,
    model_input,
    predict,
    start_batch,
)
from model.pool import CRASHED, DecodeCancelled, DecodePool
from tests.conftest import ANSWER_EVERY_PICTURE, image_bytes, make_tiny_checkpoint
from tests.crashing_decode import decode_or_die, decode_or_hang


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
    outcomes = classify_batch(paths, checkpoint, pool, ANSWER_EVERY_PICTURE)
    assert [o.path for o in outcomes] == paths
    assert [o.prediction is None for o in outcomes] == [i == 4 for i in range(9)]
    assert outcomes[4].error == "not an image (unrecognized format)" and outcomes[4].sha256
    one_by_one = [classify_batch([p], checkpoint, pool, ANSWER_EVERY_PICTURE)[0].prediction for p in paths]
    assert [o.prediction.label if o.prediction else None for o in outcomes] == [p.label if p else None for p in one_by_one]
    batches = list(classify_in_batches(paths, checkpoint, pool, ANSWER_EVERY_PICTURE, batch_size=2, ahead=2))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]  # in order, however far ahead decoding runs
    assert [o.prediction for b in batches for o in b] == [o.prediction for o in outcomes]


def test_a_file_that_kills_its_decoder_fails_alone(tmp_path, tiny_checkpoint):
    checkpoint = ckpt.load(tiny_checkpoint)
    names = ["a.jpg", "b.jpg", "crash.jpg", "c.jpg", "d.jpg", "e.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(image_bytes())
    with DecodePool(2, decode=decode_or_die) as pool:
        outcomes = classify_batch([tmp_path / n for n in names], checkpoint, pool, ANSWER_EVERY_PICTURE)
        assert [o.error for o in outcomes] == [CRASHED if n == "crash.jpg" else None for n in names]
        # a batch started behind the one with the crash (as --once and the service do) is unharmed
        first = start_batch([tmp_path / n for n in names], checkpoint, pool, ANSWER_EVERY_PICTURE)
        second = start_batch([tmp_path / "a.jpg", tmp_path / "b.jpg"], checkpoint, pool, ANSWER_EVERY_PICTURE)
        assert [o.error for o in finish_batch(first, checkpoint, pool)] == [CRASHED if n == "crash.jpg" else None for n in names]
        assert all(o.prediction for o in finish_batch(second, checkpoint, pool))


def test_a_file_that_outlasts_the_time_budget_fails_alone(tmp_path, tiny_checkpoint):
    checkpoint = ckpt.load(tiny_checkpoint)
    names = ["a.jpg", "hang.jpg", "b.jpg", "c.jpg", "hang2.jpg", "d.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(image_bytes())
    with DecodePool(2, time_budget=1.0, decode=decode_or_hang) as pool:
        started = time.monotonic()
        first = start_batch([tmp_path / n for n in names], checkpoint, pool, ANSWER_EVERY_PICTURE)
        second = start_batch([tmp_path / "a.jpg", tmp_path / "b.jpg"], checkpoint, pool, ANSWER_EVERY_PICTURE)
        outcomes = finish_batch(first, checkpoint, pool)
        assert [o.error for o in outcomes] == [
            "took longer than 1 s to decode; stopped" if n.startswith("hang") else None for n in names
        ]
        assert all(o.prediction for o in finish_batch(second, checkpoint, pool))
        assert time.monotonic() - started < 8  # two budgets, one per worker, and the replacements' start


def test_a_cancelled_wait_gives_up_within_a_second_and_close_kills_the_busy_workers(tmp_path, tiny_checkpoint):
    checkpoint = ckpt.load(tiny_checkpoint)
    (tmp_path / "hang.jpg").write_bytes(image_bytes())
    stop_at = time.monotonic() + 0.5
    pool = DecodePool(1, time_budget=600, cancelled=lambda: time.monotonic() > stop_at, decode=decode_or_hang)
    processes = [w.process for w in pool._pool]
    pending = start_batch([tmp_path / "hang.jpg"], checkpoint, pool, ANSWER_EVERY_PICTURE)
    with pytest.raises(DecodeCancelled):
        finish_batch(pending, checkpoint, pool)
    assert time.monotonic() - stop_at < 1
    pool.close()
    assert time.monotonic() - stop_at < 2 and not any(p.is_alive() for p in processes)


class LeftRight(nn.Module):
    """Logit margin (male - female) = the mean of channel 0 plus channel 1's left half minus its
    right half: a symmetric part and one that the mirror image negates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[3] // 2
        margin = x[:, 0].mean((1, 2)) + x[:, 1, :, :half].mean((1, 2)) - x[:, 1, :, half:].mean((1, 2))
        return torch.stack([torch.zeros_like(margin), margin], dim=1)


def test_close_answers_are_averaged_with_the_mirror_image_and_clear_ones_are_not():
    symmetric, asymmetric = [0.5, 0.5, -3.0, 1.0], [3.0, 1.0, 0.5, -2.5]
    x = torch.zeros(4, 2, 2, 4)
    for i, (s, a) in enumerate(zip(symmetric, asymmetric, strict=True)):
        x[i, 0] = s
        x[i, 1, :, :2] = a
    margins = mirror_averaged_logits(LeftRight(), x)[:, 1].tolist()
    # 3.5 and -2.5 are clear (at least MIRROR_MARGIN, 2); 1.5 and -1.5 are close, and the mirror
    # image (0.5 - 1.0, 1.0 + 2.5) takes them to the symmetric part: the last answer changes
    assert margins == pytest.approx([3.5, 0.5, -2.5, 1.0])


def test_a_face_and_its_mirror_image_get_the_same_answer(tmp_path):
    make_tiny_checkpoint(tmp_path / "tiny.pt", head_scale=100.0)  # logits far enough apart to tell
    checkpoint = ckpt.load(tmp_path / "tiny.pt")
    spec = checkpoint.spec
    batch = torch.randint(0, 256, (8, 3, spec.height, spec.width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = model_input(checkpoint, batch)
    with torch.inference_mode():
        # the network alone answers differently for the mirror image ...
        assert (checkpoint.model(x).float() - checkpoint.model(x.flip(3)).float()).abs().max() > 0.05
        # ... the average over both views does not
        averaged = mirror_averaged_logits(checkpoint.model, x)
        torch.testing.assert_close(averaged, mirror_averaged_logits(checkpoint.model, x.flip(3)), atol=1e-3, rtol=0)
    answers, mirrored = predict(checkpoint, batch), predict(checkpoint, batch.flip(3))
    assert [a.label for a in answers] == [m.label for m in mirrored]
    assert [a.probability for a in answers] == pytest.approx([m.probability for m in mirrored], abs=1e-3)
