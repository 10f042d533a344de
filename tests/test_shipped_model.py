"""The shipped checkpoint: it loads, its report matches it, and the serving path reproduces the
development-set accuracy written in it."""

import json

import pytest

import model
from model import checkpoint as ckpt
from model.faces import DetectorSpec
from model.pool import DecodePool
from model.precision import uses_bfloat16
from tests.conftest import ROOT, SHARED_DATA, needs_shared_data
from train.evaluate import evaluate_folder

REPORT = ROOT / "model" / "gender-watcher-report" / "summary.json"


@pytest.fixture(scope="module")
def shipped():
    return ckpt.load(model.DEFAULT_CHECKPOINT)


def test_shipped_checkpoint_is_small_and_described(shipped):
    assert model.DEFAULT_CHECKPOINT.stat().st_size < 8 * 1024 * 1024
    assert shipped.class_names == ["female", "male"]
    assert shipped.detector == DetectorSpec()  # the defaults, which `python -m train` records, are what it was made with
    summary = json.loads(REPORT.read_text())
    assert summary["version"] == shipped.version, "the committed report belongs to the committed checkpoint"
    assert shipped.meta["command"] == summary["command"]
    assert summary["command"].startswith("python -m train --data ../shared/data/faces")
    assert summary["test"]["unprefixed"]["accuracy"] >= 0.985  # the CelebA part of the test split


@needs_shared_data
@pytest.mark.parametrize("name", ["lfw", "scut"])
def test_serving_path_reproduces_the_reported_dev_accuracy(shipped, name):
    with DecodePool(2) as pool:
        result = evaluate_folder(SHARED_DATA / "other" / name, shipped, pool)
    reported = shipped.meta["dev_accuracy"][name]
    # a machine without AMX runs float32 instead of bfloat16: a few answers near 0.5 may differ
    assert abs(result["accuracy"] - reported) <= 0.005, (result["accuracy"], reported)


def test_precision_choice():
    assert uses_bfloat16("bfloat16") and not uses_bfloat16("float32")
    assert uses_bfloat16("auto", "cuda")
    with pytest.raises(ValueError, match="precision"):
        uses_bfloat16("fp8")
