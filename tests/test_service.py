"""The whole service as a real subprocess on temporary folders."""

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bench.harness import ServiceProcess, child_pids, decode_worker_pids, drop
from tests.conftest import image_bytes, make_tiny_checkpoint
from watcher import config as configuration
from watcher.notify import notify
from watcher.service import Service

IMG = image_bytes()


@pytest.fixture
def service(tmp_path, tiny_checkpoint):
    ckpt_path = tmp_path / "model.pt"
    ckpt_path.write_bytes(tiny_checkpoint.read_bytes())
    svc = ServiceProcess(tmp_path, ckpt_path, env={"WATCHDOG_USEC": "400000"}, intake={"settle_seconds": 0.5})
    yield svc
    svc.close()


def assert_exactly_once(svc, names):
    records = svc.journal_records()
    keys = [r["source"].rsplit("/", 1)[1] for r in records]
    assert sorted(keys) == sorted(names), "each input has exactly one journal record"
    assert sorted(os.listdir(svc.done)) == sorted(names)
    assert [n for n in os.listdir(svc.inbox) if not n.startswith(".")] == []
    results = json.loads(svc.results.read_text())
    assert sorted(results) == sorted(names) and set(results.values()) <= {"female", "male"}


def test_before_during_and_after_start(service):
    before = [drop(service.inbox, f"before{i}.jpg", IMG).name for i in range(5)]
    service.start(wait_ready=False)
    during = [drop(service.inbox, f"during{i}.jpg", IMG).name for i in range(5)]
    service.wait_for(lambda: service.events("start"), 60, "start")
    after = [drop(service.inbox, f"after{i}.jpg", IMG).name for i in range(5)]
    service.wait_handled(15)
    assert service.stop() == 0
    assert_exactly_once(service, before + during + after)
    batch = service.events("batch")[0]
    assert batch["count"] >= 1 and batch["checkpoint"] and batch["ms"] >= 0


def test_slowly_written_file_is_taken_only_when_complete(service):
    service.start()
    data = image_bytes(size=(300, 300))
    step = len(data) // 12 + 1
    with open(service.inbox / "slow.jpg", "wb") as f:  # 12 chunks over ~4.5 s, as a slow upload
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            time.sleep(1.5 if start == 5 * step else 0.25)  # one pause 3 times settle_seconds: still open
    service.wait_handled(1)
    (record,) = service.journal_records()
    assert record["status"] == "done", record
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert service.stop() == 0


def test_sigterm_mid_burst_loses_nothing(service):
    service.start()
    names = [f"f{i:04d}.jpg" for i in range(1500)]
    writer = threading.Thread(target=lambda: [(service.inbox / n).write_bytes(IMG) for n in names])
    writer.start()
    service.wait_handled(100)
    t0 = time.monotonic()
    assert service.stop() == 0
    assert time.monotonic() - t0 < 10
    writer.join()
    records = service.journal_records()
    handled = {r["source"].rsplit("/", 1)[1] for r in records}
    assert len(handled) == len(records)  # nothing twice
    in_inbox = {n for n in os.listdir(service.inbox) if not n.startswith(".")}
    assert handled.isdisjoint(in_inbox) and handled | in_inbox == set(names)  # nothing lost
    assert service.messages[-1].startswith("STOPPING=1")
    service.start()
    service.wait_handled(len(names), timeout=120)
    assert service.stop() == 0
    assert_exactly_once(service, names)


def test_damaged_checkpoint_leaves_the_old_model_serving(service, tmp_path):
    service.start()
    ckpt_path = tmp_path / "model.pt"
    first = service.events("start")[0]["checkpoint"]
    ckpt_path.write_bytes(ckpt_path.read_bytes()[:1000])  # damaged in place
    service.wait_for(lambda: service.events("reload_refused"), 30, "reload_refused")
    assert "model.pt" in service.events("reload_refused")[0]["reason"]
    drop(service.inbox, "a.jpg", IMG)
    service.wait_handled(1)
    assert service.journal_records()[0]["checkpoint"] == first
    new_version = make_tiny_checkpoint(tmp_path / "staged.pt", seed=7)
    os.rename(tmp_path / "staged.pt", ckpt_path)  # how train writes: complete file renamed into place
    service.wait_for(lambda: service.events("reload"), 30, "reload")
    assert service.events("reload")[0] == service.events("reload")[0] | {"old": first, "new": new_version}
    drop(service.inbox, "b.jpg", IMG)
    service.wait_handled(2)
    assert service.journal_records()[1]["checkpoint"] == new_version
    service.proc.send_signal(signal.SIGHUP)
    service.wait_for(lambda: any(e.get("reason") == "SIGHUP" for e in service.events("reload_start")), 30, "SIGHUP reload")
    service.wait_for(lambda: len(service.events("reload")) == 2, 30, "SIGHUP reload done")
    os.rename(ckpt_path, tmp_path / "aside.pt")
    service.proc.send_signal(signal.SIGHUP)  # nothing to load: said, not silent
    service.wait_for(lambda: any("not found" in e["reason"] for e in service.events("reload_refused")), 30, "refusal")
    assert service.stop() == 0


def test_notify_messages_in_order(service):
    service.start()
    time.sleep(0.6)
    assert service.stop() == 0
    kinds = [m.split("\n")[0].split("=")[0] for m in service.messages]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING"
    assert "WATCHDOG" in kinds[1:-1]
    ready = service.events("start")
    assert ready, "READY=1 only after the model was loaded and start was logged"


def test_second_instance_is_refused(service, tmp_path):
    service.start()
    from tests.conftest import run_cli

    proc = run_cli("--config", str(service.config))
    assert proc.returncode == 2 and f"another gender-watcher (pid {service.proc.pid})" in proc.stderr
    proc = run_cli("--config", str(service.config), "--once", str(service.inbox), "--move")
    assert proc.returncode == 2 and "another gender-watcher" in proc.stderr
    assert service.stop() == 0


def test_specials_are_quarantined_and_nothing_outside_is_touched(service):
    service.start()
    passwd = Path("/etc/passwd").read_bytes()
    os.symlink("/etc/passwd", service.inbox / "passwd.jpg")
    os.mkfifo(service.inbox / "fifo.jpg")
    (service.inbox / "folder.jpg").mkdir()
    drop(service.inbox, "bad.jpg", b"not an image")
    drop(service.inbox, "good.jpg", IMG)
    service.wait_handled(4)
    assert service.proc.poll() is None
    by_name = {r["source"].rsplit("/", 1)[1]: r for r in service.journal_records()}
    assert {n for n, r in by_name.items() if r["status"] == "failed"} == {"passwd.jpg", "fifo.jpg", "bad.jpg"}
    assert "symbolic link" in by_name["passwd.jpg"]["reason"] and "FIFO" in by_name["fifo.jpg"]["reason"]
    assert sorted(os.listdir(service.failed)) == ["bad.jpg", "fifo.jpg", "passwd.jpg"]
    assert (service.inbox / "folder.jpg").is_dir()
    assert Path("/etc/passwd").read_bytes() == passwd
    assert service.stop() == 0


def test_same_name_twice_keeps_both(service):
    service.start()
    drop(service.inbox, "same.jpg", image_bytes(colour=(10, 10, 10)))
    service.wait_for(lambda: (service.done / "same.jpg").exists(), 30, "first file moved out")
    drop(service.inbox, "same.jpg", image_bytes(colour=(250, 250, 250)))
    service.wait_handled(2)
    assert sorted(os.listdir(service.done)) == ["same.jpg", "same__2.jpg"]
    assert sorted(json.loads(service.results.read_text())) == ["same.jpg", "same__2.jpg"]
    assert service.stop() == 0


def test_slowly_written_checkpoint_is_swapped_only_when_complete(service, tmp_path):
    service.start()
    first = service.events("start")[0]["checkpoint"]
    new_version = make_tiny_checkpoint(tmp_path / "staged.pt", seed=11)
    data = (tmp_path / "staged.pt").read_bytes()
    step = len(data) // 6 + 1
    with open(tmp_path / "model.pt", "wb") as f:  # overwritten in place, slowly
        for i, start in enumerate(range(0, len(data), step)):
            f.write(data[start : start + step])
            f.flush()
            drop(service.inbox, f"during{i}.jpg", IMG)  # answers keep coming meanwhile
            time.sleep(0.3)
    service.wait_for(lambda: service.events("reload"), 30, "reload")
    assert [(e["old"], e["new"]) for e in service.events("reload")] == [(first, new_version)]
    service.wait_handled(6)
    assert {r["checkpoint"] for r in service.journal_records()} <= {first, new_version}
    assert all(r["status"] == "done" for r in service.journal_records())
    assert service.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_decode_workers_do_not_outlive_the_service(service, sig):
    service.start()
    drop(service.inbox, "a.jpg", IMG)
    service.wait_handled(1)
    workers = child_pids(service.proc.pid)
    assert len(workers) >= 2  # the decode processes (and multiprocessing's resource tracker)
    service.stop(sig)
    deadline = time.monotonic() + 10
    while (alive := {p for p in workers if Path(f"/proc/{p}").exists()}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"left behind after {signal.Signals(sig).name}: {alive}"


def test_idle_decode_workers_exit_and_the_next_file_starts_them(tmp_path, tiny_checkpoint):
    svc = ServiceProcess(tmp_path, tiny_checkpoint, batch={"decode_idle_seconds": 1.0})
    try:
        svc.start()
        assert len(decode_worker_pids(svc.proc.pid)) == 2
        drop(svc.inbox, "a.jpg", IMG)
        svc.wait_handled(1)
        svc.wait_for(lambda: svc.events("decode_workers_stop"), 10, "decode_workers_stop")
        svc.wait_for(lambda: not decode_worker_pids(svc.proc.pid), 10, "the decode processes to exit")
        drop(svc.inbox, "b.jpg", IMG)
        svc.wait_handled(2)
        assert [e["processes"] for e in svc.events("decode_workers_start")] == [2]
        assert len(decode_worker_pids(svc.proc.pid)) == 2
        assert svc.stop() == 0
        assert_exactly_once(svc, ["a.jpg", "b.jpg"])
    finally:
        svc.close()


def test_a_service_logging_only_warnings_starts_and_answers(tmp_path, tiny_checkpoint):
    """Its start line (an info event) is not logged: start() waits for READY=1 alone, as the
    benchmark's quiet service needs."""
    svc = ServiceProcess(tmp_path, tiny_checkpoint, logging={"format": "json", "level": "warning"})
    try:
        svc.start()
        assert not svc.events("start")
        drop(svc.inbox, "a.jpg", IMG)
        svc.wait_handled(1)
        assert svc.stop() == 0
    finally:
        svc.close()


def test_a_photo_dropped_again_after_a_stop_gets_its_own_record(service, tmp_path):
    service.start()
    drop(service.inbox, "photo.jpg", IMG)
    service.wait_handled(1)
    assert service.stop() == 0
    archive = tmp_path / "archive"
    archive.mkdir()
    os.rename(service.done / "photo.jpg", archive / "photo.jpg")
    os.rename(archive / "photo.jpg", service.inbox / "photo.jpg")  # the very same file (inode, bytes, mtime)
    service.start()
    service.wait_for(lambda: len(service.journal_records()) == 2 and os.listdir(service.done), 30, "a second record")
    assert not service.events("recovered")
    first, second = service.journal_records()
    assert first["sha256"] == second["sha256"] and second["time"] > first["time"]
    # under a name of its own, as every file whose name the results file holds already
    assert os.listdir(service.done) == ["photo__2.jpg"] == [second["key"]] and os.listdir(service.inbox) == []
    assert service.stop() == 0


def test_a_second_configuration_on_the_same_inbox_is_refused(service, tmp_path):
    from tests.conftest import run_cli

    service.start()
    other = tmp_path / "other"
    other.mkdir()
    for name in ("done", "failed", "results"):
        (other / name).mkdir()
    config = other / "config.yaml"
    config.write_text(f"inbox: {service.inbox}\ncheckpoint: {service.config.parent / 'model.pt'}\n")
    proc = run_cli("--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert f"another gender-watcher (pid {service.proc.pid}) is serving the inbox {service.inbox}" in proc.stderr
    assert service.stop() == 0


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")


@pytest.mark.parametrize("planted", ["fifo", "symlink", pytest.param("someone_elses", marks=ROOT_ONLY)])
def test_an_inbox_lock_planted_by_someone_else_does_not_keep_the_service_out(service, tmp_path, planted):
    lock = service.inbox.parent / f".gender-watcher.{service.inbox.name}.lock"
    if planted == "fifo":
        os.mkfifo(lock)
    elif planted == "symlink":
        lock.symlink_to(tmp_path / "elsewhere")
    else:
        lock.write_text("")
        os.chown(lock, os.geteuid() + 1000, -1)
    service.start()
    (warning,) = service.events("inbox_lock_not_taken")
    assert str(lock) in warning["reason"]
    drop(service.inbox, "a.jpg", IMG)
    service.wait_handled(1)
    assert service.stop() == 0
    assert not (tmp_path / "elsewhere").exists()


def test_a_second_stop_signal_ends_the_grace_period_at_once():
    svc = Service(configuration.load(None))
    svc._on_stop(signal.SIGTERM, None)
    assert not svc._stop_overdue()  # the batch in hand may still finish
    svc._on_stop(signal.SIGINT, None)
    assert svc._stop_overdue() and svc.stop_signal == signal.SIGTERM


def test_notify_never_raises_on_a_socket_that_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    notify("WATCHDOG=1")  # a stale socket must not stop the service
