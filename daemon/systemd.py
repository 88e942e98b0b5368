"""sd_notify(3) with the standard library: READY=1, STOPPING=1 and STATUS= for a Type=notify unit.

systemd passes a datagram socket path in $NOTIFY_SOCKET: a filesystem path, or an abstract-namespace
name written with a leading '@' (which stands for the NUL byte of the real address). Without the
variable every call is a no-op, so the daemon behaves the same outside systemd."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(*assignments: str) -> bool:
    """Send `KEY=value` lines to the service manager. True if sent, False when not under systemd.

    A failing send is logged and swallowed: losing a status line must never stop the daemon."""
    address = os.environ.get(NOTIFY_SOCKET_ENV)
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        # vsock: addresses (VMs) are not supported by the stdlib AF_UNIX path below.
        log.warning("sd_notify unsupported address=%s", address)
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as e:
        log.warning("sd_notify failed address=%s error=%r", os.environ.get(NOTIFY_SOCKET_ENV), str(e))
        return False
    return True


def notify_ready(status: str) -> bool:
    """Weights are on the device and the socket is listening."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def notify_stopping(status: str = "draining") -> bool:
    """Shutdown has begun; systemd waits up to TimeoutStopSec for the exit."""
    return notify("STOPPING=1", f"STATUS={status}")


def notify_status(status: str) -> bool:
    """A free-form one-line status shown by `systemctl status`."""
    return notify(f"STATUS={status}")
