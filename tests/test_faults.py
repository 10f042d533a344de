"""Make each step of the commit protocol fail (process exit, ENOSPC, exception); a rerun then
completes the work with nothing lost or doubled."""

import json
import os
import subprocess
import sys

import pytest

from bench.harness import write_config
from tests.conftest import ROOT, image_bytes, make_tiny_checkpoint

STEPS = ["journal_append", "results_replace", "fsync", "move", "rotate"]


def run(args, fault=None):
    runner = (
        [sys.executable, str(ROOT / "tests" / "fault_runner.py"), *fault, "--"] if fault else [sys.executable, "-m", "watcher"]
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*runner, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "model.pt"
    make_tiny_checkpoint(path, seed=5, head_scale=50.0)
    return path


@pytest.mark.parametrize("kind", ["exit", "enospc", "error"])
@pytest.mark.parametrize("step", STEPS)
def test_fault_then_rerun_completes(tmp_path, checkpoint, step, kind):
    config = write_config(
        tmp_path, checkpoint, batch={"max_size": 8}, intake={"settle_seconds": 0.0}, rotation={"max_bytes": 150}
    )
    names = [f"f{i:02d}.jpg" for i in range(20)] + ["bad.jpg"]
    for i, name in enumerate(names):
        (tmp_path / "inbox" / name).write_bytes(image_bytes(colour=(i * 12, 90, 200 - i * 9)) if name != "bad.jpg" else b"junk")
    args = ["--config", str(config), "--once", str(tmp_path / "inbox"), "--move"]

    broken = run(args, fault=[step, kind])
    expected = 70 if kind == "exit" else 3
    assert broken.returncode == expected, broken.stderr[-2000:]
    if kind != "exit":
        fatal = [json.loads(line) for line in broken.stderr.splitlines() if '"fatal"' in line]
        assert fatal and ("No space left" in fatal[0]["reason"] or "injected" in fatal[0]["reason"]), broken.stderr[-1000:]
    for path in (tmp_path / "results").glob("process_results*.json"):
        json.loads(path.read_text())

    rerun = run(args)
    assert rerun.returncode in (0, 1), rerun.stderr[-2000:]  # 1 when bad.jpg was left for the rerun

    assert [n for n in os.listdir(tmp_path / "inbox") if not n.startswith(".")] == []
    done, failed = set(os.listdir(tmp_path / "done")), set(os.listdir(tmp_path / "failed"))
    assert failed == {"bad.jpg"} and done == set(names) - {"bad.jpg"}
    records = []
    for path in sorted((tmp_path / "results").glob("journal*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in records) == sorted(names)
    answers = {}
    for path in (tmp_path / "results").glob("process_results*.json"):
        for key, label in json.loads(path.read_text()).items():
            assert key not in answers
            answers[key] = label
    assert sorted(answers) == sorted(done)
