"""The address other machines reach a server at, given the host it binds."""

from __future__ import annotations

import socket

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def node_ip() -> str:
    """This node's IP as Ray sees it (inside Ray), else the address of the interface the default route uses."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def advertised_host(bind_host: str) -> str:
    """bind_host itself, or the node's IP when it binds all interfaces; IPv6 literals in brackets."""
    host = node_ip() if bind_host in WILDCARD_HOSTS else bind_host
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
