"""The inbox service: one main loop that decides everything.

    inbox -> intake (ready files) -> batch -> model -> results (journal, results file) -> move

Signal handlers, the inbox watch thread and the reload thread only record what happened and wake
the loop (a self-pipe); the loop then takes ready files, forms a batch (full, or the first
file has waited `batch.max_wait_ms`) and starts its decoding; once that is done, the files that
came meanwhile start decoding while the batch is classified and committed. Between batches it
swaps in a reloaded model, pings the systemd watchdog, rescans the inbox on schedule and stops
the decode processes when no file has come for `batch.decode_idle_seconds`.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import socket
import time
from contextlib import suppress
from pathlib import Path

import torch

from model import checkpoint as ckpt
from model.pool import DecodeCancelled, PendingDecode
from watcher import log, pipeline, startup
from watcher.config import Config, inbox_problem
from watcher.intake import Intake
from watcher.notify import notify, watchdog_interval
from watcher.reload import Reloader, signature

# After SIGTERM the batch in hand may take this many seconds more to decode; then it is left in
# the inbox for the next start, so that the service always exits well within systemd's 30 s.
STOP_GRACE = 5.0


class Waker:
    """A self-pipe (as in gunicorn's arbiter): any thread, or a signal via set_wakeup_fd, writes a
    byte; the main loop sleeps in select() until a byte arrives or its next deadline passes."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        for sock in (self._read, self._write):
            sock.setblocking(False)

    def fileno(self) -> int:
        return self._write.fileno()

    def wake(self) -> None:
        with suppress(BlockingIOError):  # a full buffer already means "wake up"
            self._write.send(b"x")

    def wait(self, timeout: float) -> None:
        if select.select([self._read], [], [], max(0.0, timeout))[0]:
            with suppress(BlockingIOError):
                while self._read.recv(4096):
                    pass


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = log.get()
        self.waker = Waker()
        self.stop_signal: int | None = None
        self.stop_requested_at = 0.0
        self.reload_requested = False

    # Signal handlers only record; set_wakeup_fd makes the signal itself wake the loop.
    def _on_stop(self, signum: int, _frame: object) -> None:
        """The first stop signal starts the grace period; a second one ends it at once."""
        if self.stop_signal is None:
            self.stop_signal = signum
            self.stop_requested_at = time.monotonic()
        else:
            self.stop_requested_at = float("-inf")

    def _stop_overdue(self) -> bool:
        return self.stop_signal is not None and time.monotonic() - self.stop_requested_at >= STOP_GRACE

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self.reload_requested = True

    def run(self) -> int:
        config = self.config
        signal.set_wakeup_fd(self.waker.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        torch.set_num_threads(config.batch.torch_threads)
        ping_every = watchdog_interval()
        # The watchdog is pinged from the loop, and also while a slow batch decodes (huge PNGs),
        # as long as the decode processes make progress.
        beats = {"heartbeat": lambda: notify("WATCHDOG=1"), "heartbeat_seconds": ping_every} if ping_every else {}
        checkpoint_signature = signature(config.checkpoint)  # before loading: a file replaced meanwhile is new
        with (
            startup.serving(config, inbox_may_be_missing=True) as (checkpoint, store),
            pipeline.decode_pool(config, cancelled=self._stop_overdue, **beats) as pool,
        ):
            timing = config.intake.settle_seconds, config.intake.rescan_seconds
            problem = functools.partial(inbox_problem, config)
            intake = Intake(config.inbox, *timing, watch=config.intake.watch, wake=self.waker.wake, problem=problem)
            intake.rescan()
            reloader = Reloader(
                config.checkpoint,
                config.batch.precision,
                checkpoint,
                self.waker.wake,
                config.reload.poll_seconds,
                loaded_signature=checkpoint_signature,
            )
            reloader.start_watching()
            self.log.info(
                "start",
                pid=os.getpid(),
                inbox=str(config.inbox),
                checkpoint=checkpoint.version,
                precision=str(checkpoint.dtype).removeprefix("torch."),
                config=config.source,
            )
            if pool.memory_limit_error:
                self.log.warning("decode_memory_not_limited", reason=pool.memory_limit_error, decode_memory_mb=pool.memory_mb)
            if ping_every is not None and pool.time_budget >= ping_every:
                self.log.warning(
                    "decode_seconds_too_long",
                    decode_seconds=pool.time_budget,
                    reason=f"a file may hold the watchdog ping back past systemd's limit; keep it under {ping_every:g}",
                )
            notify(f"READY=1\nSTATUS=serving checkpoint {checkpoint.version}")
            try:
                self._loop(intake, reloader, pipeline.Pipeline(config, pool, store), checkpoint, ping_every)
            except DecodeCancelled:
                self.log.warning("stopped_before_the_batch_was_decoded", grace_seconds=STOP_GRACE, files="left in the inbox")
            finally:
                notify("STOPPING=1")
                intake.stop()
                reloader.stop_watching()
        self.log.info("stop", signal=signal.Signals(self.stop_signal).name if self.stop_signal else None)
        return 0

    def _loop(
        self,
        intake: Intake,
        reloader: Reloader,
        flow: pipeline.Pipeline,
        checkpoint: ckpt.Checkpoint,
        ping_every: float | None,
    ) -> None:
        config, pool = self.config, flow.pool
        max_size, max_wait = config.batch.max_size, config.batch.max_wait_ms / 1000
        decode_idle = config.batch.decode_idle_seconds
        now = time.monotonic()
        next_ping = last_batch_at = now
        pending: list[Path] = []
        first_pending_at = 0.0
        # The batch whose decoding is under way. Once it is decoded, the files that came meanwhile
        # start decoding before it is classified and committed, so the decode processes work
        # while the model does (as --once's look-ahead does).
        in_flight: tuple[PendingDecode, ckpt.Checkpoint] | None = None

        def take_ready() -> None:
            nonlocal pending, first_pending_at
            if (ready := intake.take()) and not pending:
                first_pending_at = time.monotonic()
            pending += ready

        def start_batch() -> tuple[PendingDecode, ckpt.Checkpoint]:
            nonlocal pending, first_pending_at, last_batch_at
            batch, pending = pending[:max_size], pending[max_size:]
            first_pending_at = last_batch_at = time.monotonic()
            if not pool.running:
                self.log.info("decode_workers_start", processes=pool.workers)
            return flow.start(batch, checkpoint), checkpoint

        def finish_in_flight(start_next: bool = True) -> None:
            nonlocal in_flight
            batch, batch_checkpoint = in_flight
            in_flight = None
            pool.wait(batch)
            if start_next and self.stop_signal is None:
                take_ready()
                if pending:
                    in_flight = start_batch()
            flow.commit(batch, batch_checkpoint)
            intake.release(batch.paths)

        while self.stop_signal is None:
            now = time.monotonic()
            if ping_every is not None and now >= next_ping:
                notify("WATCHDOG=1")
                next_ping = now + ping_every
            sighup, self.reload_requested = self.reload_requested, False
            reloaded, reload_at = reloader.step(now, sighup)
            if reloaded is not None:
                checkpoint = reloaded
                notify(f"STATUS=serving checkpoint {checkpoint.version}")
            if now >= intake.rescan_at:
                intake.rescan(now)
            take_ready()
            if in_flight is not None:
                finish_in_flight()
                continue
            if pending and (len(pending) >= max_size or now - first_pending_at >= max_wait):
                in_flight = start_batch()
                continue
            deadlines = [intake.rescan_at, reload_at] + ([next_ping] if ping_every else [])
            if decode_idle and pool.running and not pending:
                if now - last_batch_at < decode_idle:
                    deadlines.append(last_batch_at + decode_idle)
                else:
                    pool.close()
                    self.log.info("decode_workers_stop", idle_seconds=decode_idle)
            if pending:
                deadlines.append(first_pending_at + max_wait)
            if intake.waiting():
                deadlines.append(now + max(0.05, min(0.25, config.intake.settle_seconds / 2)))
            self.waker.wait(min(deadlines) - time.monotonic())
        if in_flight is not None:
            finish_in_flight(start_next=False)  # the batch in hand is made durable before stopping
