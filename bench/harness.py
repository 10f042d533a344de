"""The real service as a subprocess on temporary folders, and what it says and does: shared by
the tests and the benchmark (`python -m bench`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from watcher.config import LoggingSettings
from watcher.results import exact_names

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, checkpoint: Path, **sections: dict) -> Path:
    """A service config in `folder` with inbox/, done/, failed/, results/ created there: JSON
    logs at info level, and faces answered as tests.conftest.ANSWER_EVERY_PICTURE, unless
    `sections` say otherwise (a section given replaces the default one)."""
    for name in ("inbox", "done", "failed", "results"):
        (folder / name).mkdir(exist_ok=True)
    values = {"logging": {"format": "json", "level": "info"}, "faces": {"no_face": "answer"}} | sections
    lines = [f"checkpoint: {checkpoint}"] + [f"{name}: {json.dumps(v)}" for name, v in values.items()]
    path = folder / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class ServiceProcess:
    def __init__(self, folder: Path, checkpoint: Path, env: dict | None = None, **sections: dict) -> None:
        self.folder = folder
        self.config = write_config(folder, checkpoint, **sections)
        level = sections.get("logging", {}).get("level", LoggingSettings.level)
        self.logs_start = logging.getLevelNamesMapping()[level.upper()] <= logging.INFO  # the start line is an info event
        self.inbox, self.done, self.failed = folder / "inbox", folder / "done", folder / "failed"
        self.results, self.journal = folder / "results" / "process_results.json", folder / "results" / "journal.jsonl"
        self.notify_path = folder / "notify.sock"
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(str(self.notify_path))
        self.notify_sock.settimeout(0.2)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(self.notify_path), **(env or {}))
        self.logs: list[dict] = []
        self.messages: list[str] = []
        self.message_times: list[float] = []  # time.monotonic() when each of `messages` arrived
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        self.logs.clear()
        self.messages.clear()
        self.message_times.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "--config", str(self.config)],
            env=self.env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read_logs, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._read_notify, daemon=True).start()
        if wait_ready:
            # the start line is logged before READY=1, but reaches us through another pipe
            self.wait_for(
                lambda: "READY=1" in " ".join(self.messages) and (self.events("start") or not self.logs_start),
                60,
                "READY=1 and start",
            )
        return self

    def _read_logs(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            try:
                self.logs.append(json.loads(line))
            except ValueError:
                self.logs.append({"event": "raw", "line": line.rstrip()})

    def _read_notify(self) -> None:
        while (self.proc and self.proc.poll() is None) or self._drain_once():
            self._drain_once()

    def _drain_once(self) -> bool:
        try:
            message = self.notify_sock.recv(4096).decode()
            self.message_times.append(time.monotonic())
            self.messages.append(message)
            return True
        except (TimeoutError, OSError):
            return False

    def events(self, name: str) -> list[dict]:
        return [e for e in list(self.logs) if e.get("event") == name]

    def wait_for(self, condition: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode} while waiting for {what}: {self.logs[-5:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last logs: {self.logs[-5:]}")

    def journal_records(self) -> list[dict]:
        # A rotation can rename journal.jsonl between listing and reading it; list again then.
        for _ in range(100):
            try:
                return self._read_journals()
            except FileNotFoundError:
                time.sleep(0.01)
        return self._read_journals()

    def _read_journals(self) -> list[dict]:
        records = []
        for path in sorted(self.journal.parent.glob("journal*.jsonl")):
            text = path.read_text()
            complete = text[: text.rfind("\n") + 1]  # a line being appended right now is not committed yet
            records += [exact_names(json.loads(line)) for line in complete.splitlines() if line.strip()]
        return records

    def wait_handled(self, count: int, timeout: float = 60) -> None:
        """Until `count` files are committed to the journal and moved (the move comes after the commit)."""

        def handled() -> bool:
            records = self.journal_records()
            return len(records) >= count and all(os.path.lexists(r["dest"]) for r in records)

        self.wait_for(handled, timeout, f"{count} files committed and moved")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        time.sleep(0.3)  # let the reader threads catch the last lines and datagrams
        return code

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify_sock.close()


def drop(folder: Path, name: str, data: bytes) -> Path:
    """Write a file the way careful uploaders do: to a temporary name, then rename into place."""
    tmp = folder / f".drop-{abs(hash(name))}.part"
    tmp.write_bytes(data)
    os.rename(tmp, folder / name)
    return folder / name


def _stat(pid: int) -> list[int]:
    """The numeric fields of /proc/PID/stat after the command name (0: parent pid, 10 and 11: user and system CPU ticks)."""
    return [int(f) for f in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1:]]


def cpu_ticks(pid: int) -> int:
    """User and system CPU time of `pid` so far, in clock ticks."""
    return sum(_stat(pid)[10:12])


def child_pids(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if _stat(int(entry.name))[0] == pid:
                    kids.append(int(entry.name))
    return kids


def descendant_pids(pid: int) -> list[int]:
    """Children, their children and so on (a local Ray's processes sit several levels down)."""
    found, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        found += kids
        todo += kids
    return found


def decode_worker_pids(pid: int) -> list[int]:
    """The decode processes of the service `pid` (not multiprocessing's resource tracker)."""
    return [p for p in child_pids(pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
