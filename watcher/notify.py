"""systemd notify protocol with the standard library: a datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

from watcher import log

_warned = False


def notify(message: str) -> None:
    """Send e.g. 'READY=1' when run under systemd (NOTIFY_SOCKET set). Like sd_notify, it never
    raises: a socket that is gone or refuses the message must not stop the service."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        global _warned
        if not _warned:  # once: the watchdog pings every few seconds
            log.get().warning("systemd_notify_failed", socket=os.environ["NOTIFY_SOCKET"], reason=str(exc))
            _warned = True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the configured timeout), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
