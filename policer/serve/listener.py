"""The service's listening socket, and who may use it: a loopback address, or a bearer
token (``--token-file``), or ``--insecure`` said out loud."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

__all__ = ["ServeError", "bind", "check_listener", "is_loopback", "read_token"]


class ServeError(Exception):
    """A setting ``policer serve`` cannot start with (exit status 2)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> str:
    """The bearer token in ``path`` (its first line, without white space)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ServeError(f"--token-file {path}: {e.strerror or e}") from None
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise ServeError(f"--token-file {path}: expected one token (printable, no spaces)")
    return token


def check_listener(host: str, token: str | None, insecure: bool) -> None:
    """Refuse a listener beyond loopback that anyone could use."""
    if token is None and not insecure and not is_loopback(host):
        raise ServeError(
            f"--listen {host}: not a loopback address; give --token-file (clients then "
            "send 'Authorization: Bearer TOKEN') or --insecure to serve anyone who can "
            "reach it")


def bind(host: str, port: int, listen: bool = True) -> socket.socket:
    """The service's socket, bound (an address in use fails here, before anything else
    is done) and, with ``listen``, listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    sock.set_inheritable(True)
    return sock
