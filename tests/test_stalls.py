"""A file or a worker that stalls: the decode time budget, the heartbeat only on progress, and
SIGTERM within seconds whatever the decode processes do."""

import os
import signal
import time
from itertools import pairwise

import pytest

from bench.harness import ServiceProcess, decode_worker_pids, drop
from tests.conftest import image_bytes, slow_jpeg
from watcher.service import STOP_GRACE

IMG = image_bytes()


@pytest.fixture
def make_service(tmp_path, tiny_checkpoint):
    made = []

    def make(decode_seconds: float) -> ServiceProcess:
        batch = {"decode_seconds": decode_seconds}
        svc = ServiceProcess(tmp_path, tiny_checkpoint, env={"WATCHDOG_USEC": "4000000"}, batch=batch)
        made.append(svc)
        return svc.start()

    yield make
    for svc in made:
        svc.close()


def watchdog_gaps(svc: ServiceProcess) -> list[float]:
    times = [t for t, m in zip(svc.message_times, svc.messages, strict=True) if "WATCHDOG=1" in m]
    return [b - a for a, b in pairwise(times)]


def test_a_file_over_the_decode_budget_fails_alone_and_is_not_tried_again(make_service):
    svc = make_service(decode_seconds=1.0)
    drop(svc.inbox, "slow.jpg", slow_jpeg(10000))  # about 4 s to decode
    for i in range(3):
        drop(svc.inbox, f"ok{i}.jpg", IMG)
    svc.wait_handled(4, timeout=30)
    by_name = {os.path.basename(r["source"]): r for r in svc.journal_records()}
    assert by_name["slow.jpg"]["status"] == "failed"
    assert by_name["slow.jpg"]["reason"] == "took longer than 1 s to decode; stopped"
    assert all(by_name[f"ok{i}.jpg"]["status"] == "done" for i in range(3))
    assert sorted(os.listdir(svc.failed)) == ["slow.jpg"]
    assert svc.stop() == 0


def test_stopped_workers_are_replaced_with_no_heartbeat_meanwhile_and_sigterm_is_prompt(make_service):
    svc = make_service(decode_seconds=3.0)
    drop(svc.inbox, "first.jpg", IMG)
    svc.wait_handled(1)
    workers = decode_worker_pids(svc.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    for i in range(4):
        drop(svc.inbox, f"b{i}.jpg", IMG)
    svc.wait_handled(5, timeout=30)
    handled_in = time.monotonic() - stopped_at
    records = svc.journal_records()[1:]
    # each stopped worker's first file fails when its budget runs out; the rest go to new workers
    assert sorted(r["status"] for r in records) == ["done", "done", "failed", "failed"]
    assert {r["reason"] for r in records if r["status"] == "failed"} == {"took longer than 3 s to decode; stopped"}
    assert handled_in < 3.0 * 2 + 5  # the two budgets run one after the other, and the new workers start
    assert max(watchdog_gaps(svc)) >= 2.5  # no heartbeat while nothing progressed
    assert not set(workers) & set(decode_worker_pids(svc.proc.pid))
    assert svc.stop() == 0


def test_sigterm_exits_within_seconds_while_the_workers_hang_and_leaves_the_batch(make_service):
    svc = make_service(decode_seconds=60.0)
    for pid in decode_worker_pids(svc.proc.pid):
        os.kill(pid, signal.SIGSTOP)
    drop(svc.inbox, "waiting.jpg", IMG)
    time.sleep(1)  # taken into a batch at once (renamed in), now waiting for the stopped workers
    started = time.monotonic()
    assert svc.stop(timeout=15) == 0
    assert time.monotonic() - started < STOP_GRACE + 5 <= 10
    assert svc.events("stopped_before_the_batch_was_decoded")
    assert os.listdir(svc.inbox) == ["waiting.jpg"] and svc.journal_records() == []
    svc.start()  # and the next start answers it
    svc.wait_handled(1)
    assert os.listdir(svc.done) == ["waiting.jpg"]
    assert svc.stop() == 0
