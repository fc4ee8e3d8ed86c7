"""Addresses: is a host this machine (loopback), and ``host:port`` with IPv6 bracketed."""

from __future__ import annotations

import ipaddress


def bare(host: str) -> str:
    """``[::1]`` -> ``::1``; any other host unchanged."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8``, ``::1`` (bracketed or not), ``::ffff:127.x``."""
    host = bare(host.strip())
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def split_host_port(text: str) -> tuple[str, str]:
    """``host[:port]`` or ``[v6][:port]`` -> (host without brackets, port or "")."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if text.count(":") > 1:  # a bare IPv6 address has no port
        return text, ""
    host, _, port = text.partition(":")
    return host, port


def host_port(host: str, port: int | str) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:5000``)."""
    host = bare(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
