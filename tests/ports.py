"""A free TCP port for a server a test starts later, chosen where nothing else will take it in the meantime.

A port from bind(0) lies in the kernel's ephemeral range, where Ray's and gRPC's own bind(0) calls and outgoing
connections can take it before the server under test binds it (a CI run lost `serve --port` that way). Ports
between Ray's worker range (10002-19999) and the ephemeral range are handed out only by us."""

import random
import socket

RAY_WORKER_PORTS_END = 19999


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    low, high = RAY_WORKER_PORTS_END + 1, _ephemeral_low() - 1
    candidates = random.sample(range(low, high + 1), min(200, high - low + 1)) if high > low else []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no quiet range on this machine: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
