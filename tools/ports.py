"""A free local TCP port, for tests and benchmarks that must name a port before anything binds it
(a server that can report its own port should be started on port 0 instead)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (it may be taken again by the time it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
