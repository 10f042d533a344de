"""The decode worker pool: `decode_file` in processes of its own, for the service, `--once`,
evaluation and training.

Each worker takes tasks (a list of paths) through one pipe and sends back one `Decoded` per file
through another, so the pool always knows which file a worker is on. A worker that dies on a
file, or spends longer than the time budget on it, is killed and replaced: that file fails with
the reason and the rest go to the new worker. Workers limit the memory they may allocate, and the
pool pings a heartbeat only while results arrive.
"""

from __future__ import annotations

import ctypes
import fcntl
import math
import multiprocessing
import os
import pickle
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

from model import DEFAULT_MAX_BYTES, DEFAULT_MEMORY_MB
from model.decode import Decoded, decode_file
from model.faces import Preprocessing
from model.files import file_identity

CRASHED = "the decoder crashed on this file"
# Seconds a worker may spend on one file before it is killed and the file fails (the service's
# own budget is batch.decode_seconds in the config).
DEFAULT_TIME_BUDGET = 60.0
STARTUP_SECONDS = 60.0  # for a worker to start and say it is Ready (imports take about 0.2 s)
STOP_SECONDS = 2.0  # for an idle worker to exit when asked, before it is killed
CANCEL_CHECK_SECONDS = 0.25  # how often a wait asks whether it is cancelled
OUT_OF_MEMORY = "needs more memory to decode than a decode process may use ({} MB)"


# Set for the workers only: one thread each, and no BLAS thread buffers (which NumPy's OpenBLAS
# reserves per core: about 180 MB of address space on 2 cores, counted by the memory limit).
WORKER_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


class Ready(NamedTuple):
    """A worker's first message: it is up, and whether its memory limit could be set."""

    memory_limit_error: str | None


SENT_AHEAD = 2  # tasks sent to a worker before it has finished the first of them
RESULTS_PIPE_BYTES = 1 << 20  # the most an unprivileged process may ask for by default (pipe-max-size)
_CONTEXT = multiprocessing.get_context("spawn")


def _cpu_quota(folder: Path) -> float | None:
    """The CPUs a cgroup folder's quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), or None
    where it sets none or has no such file."""
    with suppress(OSError, ValueError):
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with suppress(OSError, ValueError):
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroups: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process can keep busy, for sizing worker pools and thread counts: those it may
    run on (taskset, cpusets), fewer where a cgroup quota caps its CPU time (`docker --cpus`,
    systemd's CPUQuota=), rounded up; at least 1. os.cpu_count() sees every core of the host."""
    cpus = len(os.sched_getaffinity(0))
    folders = []
    with suppress(OSError, ValueError):  # no cgroups here, or a line of another shape
        for line in own_cgroups.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers and "cpu" not in controllers.split(","):
                continue
            base = cgroup_root / controllers  # "" for cgroup v2's one hierarchy, "cpu,cpuacct" for v1's
            # The quota may be set on any folder from this process's up to the mount; inside a
            # container the path names the host's hierarchy and only the mount itself exists.
            own = base / path.strip("/")
            folders += [own, *(folder for folder in own.parents if folder == base or base in folder.parents)]
    quotas = [quota for folder in dict.fromkeys(folders) if (quota := _cpu_quota(folder)) is not None]
    return max(1, min([cpus, *(math.ceil(quota) for quota in quotas)]))


DecodeFunction = Callable[[Path, Preprocessing, int], Decoded]


def _worker_main(tasks: Connection, results: Connection, parent: int, decode: DecodeFunction, memory_mb: int) -> None:
    """A decode worker: for each task received (paths, preprocessing, byte limit), one Decoded sent
    back per file, in order, each before the next file is begun; None or a closed pipe ends it.
    What it may allocate is limited to `memory_mb`: a file that needs more fails with MemoryError.

    It leaves signals to the parent, which decides when workers stop, and has the kernel kill it
    when the parent dies (even by SIGKILL), so no orphan outlives the service."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_mb << 20, memory_mb << 20))
        results.send(Ready(None))
    except (OSError, ValueError) as exc:  # e.g. a seccomp filter that forbids setrlimit
        results.send(Ready(f"{type(exc).__name__}: {exc}"))
    with suppress(EOFError, BrokenPipeError):
        while (task := tasks.recv()) is not None:
            paths, prep, max_bytes = task
            for path in paths:
                try:
                    decoded = decode(path, prep, max_bytes)
                except MemoryError:
                    decoded = Decoded(None, OUT_OF_MEMORY.format(memory_mb), None, file_identity(path))
                results.send(decoded)


class DecodeCancelled(RuntimeError):
    """`DecodePool.wait` gave up because its `cancelled` callback said so (the service is stopping)."""


@dataclass(eq=False)
class _Task:
    """A slice of a batch's files for one worker, and their results as they arrive."""

    paths: list[Path]
    prep: Preprocessing
    max_bytes: int
    results: list[Decoded] = field(default_factory=list)
    sent: bool = False

    @property
    def remaining(self) -> list[Path]:
        return self.paths[len(self.results) :]


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    tasks_out: Connection
    results_in: Connection
    tasks: list[_Task] = field(default_factory=list)  # not finished, oldest first; the first SENT_AHEAD sent
    progress_at: float = 0.0  # when it last sent a result, or was given work while idle


@dataclass
class PendingDecode:
    """Files whose decoding is under way: one task (a slice of the paths) per worker."""

    paths: list[Path]
    tasks: list[_Task]


class DecodePool:
    """Worker processes that read, hash and decode files, each file within a time budget.

    Processes, not threads: most of the per-image work holds the GIL, so threads barely add up.
    Workers are spawned fresh (not forked from a process with live threads): they import this
    module and, as spawned processes do, the parent's `__main__` (hence the `if __name__` guard).
    Each worker gets its share of a batch and sends one result per file, so the pool knows which
    file a worker is on: a worker that dies on a file (a decoder crash) or spends longer than
    `time_budget` seconds on one (a hostile image, a stopped process) is killed and replaced,
    that file fails with the reason, and the files after it go to the new worker.
    """

    def __init__(
        self,
        workers: int,
        time_budget: float = DEFAULT_TIME_BUDGET,
        heartbeat: Callable[[], object] | None = None,
        heartbeat_seconds: float = 5.0,
        cancelled: Callable[[], bool] = lambda: False,
        decode: DecodeFunction = decode_file,
        memory_mb: int = DEFAULT_MEMORY_MB,
    ) -> None:
        """`heartbeat` is called at most every `heartbeat_seconds` while `wait` receives results
        (the service pings systemd's watchdog with it: a batch of huge PNGs can take minutes); a
        worker that makes no progress brings no heartbeat. `wait` raises DecodeCancelled soon
        after `cancelled()` turns true. `decode` is what a worker runs per file; `memory_mb` is
        what it may allocate (memory_limit_error says why that could not be set, if so)."""
        self.workers, self.time_budget, self.memory_mb = workers, time_budget, memory_mb
        self.memory_limit_error: str | None = None
        self.heartbeat, self.heartbeat_seconds = heartbeat, heartbeat_seconds
        self.cancelled, self.decode = cancelled, decode
        self._last_beat = time.monotonic()
        self._pool: list[_Worker] = []
        self._start()

    @property
    def running(self) -> bool:
        """Whether the worker processes are up (`close` stops them; `start` spawns them again)."""
        return bool(self._pool)

    def _spawn(self) -> _Worker:
        tasks_in, tasks_out = _CONTEXT.Pipe(duplex=False)
        results_in, results_out = _CONTEXT.Pipe(duplex=False)
        with suppress(OSError):  # room for a whole task's results while the parent is busy elsewhere
            fcntl.fcntl(results_out.fileno(), fcntl.F_SETPIPE_SZ, RESULTS_PIPE_BYTES)
        process = _CONTEXT.Process(
            target=_worker_main, args=(tasks_in, results_out, os.getpid(), self.decode, self.memory_mb), daemon=True
        )
        with _environment(WORKER_ENVIRONMENT):
            process.start()
        tasks_in.close()  # the worker's ends: closed here, so that its death reads as end-of-file
        results_out.close()
        return _Worker(process, tasks_out, results_in, progress_at=time.monotonic())

    def _start(self) -> None:
        self._pool = [self._spawn() for _ in range(self.workers)]
        for worker in self._pool:  # all workers up now, not during the first batch
            try:
                ready = worker.results_in.recv() if worker.results_in.poll(STARTUP_SECONDS) else None
            except (EOFError, OSError):
                ready = None
            if isinstance(ready, Ready):
                self.memory_limit_error = ready.memory_limit_error
            else:
                worker.process.join(0.1)
                code = worker.process.exitcode
                self.close()
                why = f"exited with status {code}" if code is not None else f"did not start within {STARTUP_SECONDS:.0f} s"
                raise RuntimeError(f"a decode worker {why}")

    def start(self, paths: list[Path], prep: Preprocessing, max_bytes: int = DEFAULT_MAX_BYTES) -> PendingDecode:
        """Hand the files, split evenly, to the workers; returns at once."""
        if not self._pool:
            self._start()
        share = -(-len(paths) // self.workers) or 1
        tasks = [_Task(paths[i : i + share], prep, max_bytes) for i in range(0, len(paths), share)]
        for worker, task in zip(self._pool, tasks, strict=False):
            worker.tasks.append(task)
            self._feed(worker)
        return PendingDecode(paths, tasks)

    def _feed(self, worker: _Worker) -> None:
        """Send the worker its next tasks, no more than SENT_AHEAD at a time: a caller that starts
        many batches before waiting must not fill the pipes (the worker would block on its results,
        the parent on sending)."""
        if worker.tasks and not worker.tasks[0].sent:
            worker.progress_at = time.monotonic()  # an idle worker's clock starts with its task
        for task in worker.tasks[:SENT_AHEAD]:
            if not task.sent:
                task.sent = True
                with suppress(OSError):  # a dead worker: found out, and replaced, when its results are awaited
                    worker.tasks_out.send((task.remaining, task.prep, task.max_bytes))

    def wait(self, pending: PendingDecode) -> list[Decoded]:
        """The results of `start`, in the order of its paths."""
        for task in pending.tasks:
            while task.remaining:
                self._receive(next(w for w in self._pool if task in w.tasks))
        return [d for task in pending.tasks for d in task.results]

    def _receive(self, worker: _Worker) -> None:
        """One result from `worker` into its oldest task; or, when it died or ran out of time on
        its file, that file's failure, and the worker replaced."""
        # A result already in the pipe is taken first: a worker whose results were not read
        # meanwhile has been working (or blocked on a full pipe), not stuck.
        deadline = worker.progress_at + self.time_budget
        while True:
            try:
                if worker.results_in.poll(max(0.0, min(deadline - time.monotonic(), CANCEL_CHECK_SECONDS))):
                    decoded = worker.results_in.recv()
                    if not isinstance(decoded, Ready):  # a replacement's first word
                        break
                    continue
            except (EOFError, OSError, pickle.UnpicklingError):
                self._replace(worker, CRASHED)
                return
            if self.cancelled():
                raise DecodeCancelled("stopped waiting for the decode workers")
            if time.monotonic() >= deadline:
                self._replace(worker, f"took longer than {self.time_budget:g} s to decode; stopped")
                return
        worker.progress_at = time.monotonic()
        task = worker.tasks[0]
        task.results.append(decoded)
        if not task.remaining:
            worker.tasks.pop(0)
            self._feed(worker)
        if self.heartbeat is not None and worker.progress_at - self._last_beat >= self.heartbeat_seconds:
            self.heartbeat()
            self._last_beat = worker.progress_at

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill `worker`, fail the file it was on with `reason`, and give the rest of its work to a new one."""
        _end(worker, 0)
        task = worker.tasks[0]
        task.results.append(Decoded(None, reason, None, file_identity(task.remaining[0])))
        replacement = self._spawn()
        replacement.tasks = [t for t in worker.tasks if t.remaining]
        for unfinished in replacement.tasks:
            unfinished.sent = False
        self._pool[self._pool.index(worker)] = replacement
        self._feed(replacement)

    def close(self) -> None:
        """Stop the workers: at once if they still have work (the service is stopping, or a batch
        was abandoned), else once they have read their stop message. An idle service does this
        to give their memory back; the next `start` spawns new ones (about 0.2 s on 2 cores)."""
        busy = any(w.tasks for w in self._pool)
        for worker in self._pool:
            with suppress(OSError):
                worker.tasks_out.send(None)
        for worker in self._pool:
            _end(worker, 0 if busy else STOP_SECONDS)
        self._pool = []

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, for a child process started meanwhile."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end(worker: _Worker, grace: float) -> None:
    """Wait up to `grace` seconds for the worker to exit, then kill it (a stopped one too)."""
    worker.process.join(grace)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.tasks_out.close()
    worker.results_in.close()
