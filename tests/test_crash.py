"""SIGKILL the real service at random moments under a steady stream of files; lose and double nothing.

The default suite runs a few kills; `make soak` runs the full 100+.
"""

import json
import os
import random
import shutil
import threading
import time

import pytest

from bench.harness import ServiceProcess
from tests.conftest import image_bytes, make_tiny_checkpoint, run_cli


def corpus(count: int, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        files[f"in{i:05d}.jpg"] = image_bytes(size=(rng.randint(20, 90), rng.randint(20, 90)), colour=colour)
    files["in_broken.jpg"] = b"\xff\xd8\xff\xe0 not really"
    return files


def results_union(svc) -> dict[str, str]:
    union: dict[str, str] = {}
    for path in sorted(svc.results.parent.glob("process_results*.json")):
        for key, label in json.loads(path.read_text()).items():
            assert key not in union, f"{key} answered twice"
            union[key] = label
    return union


def crash_run(tmp_path, kills: int, files_count: int, seed: int) -> None:
    rng = random.Random(seed)
    checkpoint = tmp_path / "model.pt"
    make_tiny_checkpoint(checkpoint, seed=3, head_scale=50.0)
    svc = ServiceProcess(tmp_path, checkpoint, intake={"settle_seconds": 0.3}, rotation={"max_bytes": 3000})
    files = corpus(files_count, seed)
    names = list(files)
    fed = threading.Event()

    pause = kills * 3.0 / (len(names) / 10)  # spread the stream over roughly the whole kill phase

    def feed():
        for start in range(0, len(names), 10):  # a steady stream of groups of 10
            for name in names[start : start + 10]:
                tmp = svc.inbox / f".{name}.part"
                tmp.write_bytes(files[name])
                os.rename(tmp, svc.inbox / name)
            time.sleep(pause)
        fed.set()

    feeder = threading.Thread(target=feed)
    try:
        svc.start()
        feeder.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 0.6))
            svc.proc.kill()
            svc.proc.wait()
            for path in svc.results.parent.glob("process_results*.json"):
                json.loads(path.read_text())  # valid JSON after every kill
            svc.start()
        feeder.join()
        svc.wait_handled(len(names), timeout=300)
        assert svc.stop() == 0
    finally:
        fed.wait(60)
        svc.close()

    done, failed = set(os.listdir(svc.done)), set(os.listdir(svc.failed))
    assert done.isdisjoint(failed) and done | failed == set(names), "every input in exactly one of done/ and failed/"
    assert failed == {"in_broken.jpg"}
    records = svc.journal_records()
    assert sorted(r["source"].rsplit("/", 1)[1] for r in records) == sorted(names), "one journal record per input"
    answers = results_union(svc)
    assert sorted(answers) == sorted(done)

    clean = tmp_path / "clean"
    clean.mkdir()
    for name in done:
        shutil.copy(svc.done / name, clean / name)
    out = tmp_path / "clean.json"
    proc = run_cli("--once", str(clean), "--output", str(out), "--config", str(svc.config))
    assert proc.returncode == 0, proc.stderr
    assert answers == json.loads(out.read_text()), "same labels as a clean one-shot run"
    assert len(list(svc.results.parent.glob("process_results.*.json"))) >= 1, "rotation was exercised"


def test_crash_short(tmp_path):
    crash_run(tmp_path, kills=5, files_count=400, seed=1)


@pytest.mark.soak
def test_crash_soak(tmp_path):
    crash_run(tmp_path, kills=int(os.environ.get("SOAK_KILLS", "120")), files_count=6000, seed=2)
