"""Who may relay: authenticated sessions, and clients in ``--relay-networks``.

Everyone else gets ``550 5.7.1`` for a recipient in a domain not served
here (the session's check). This module only parses the networks and
answers whether a peer address is in them; the worker asks it once per
connection.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def relay_networks(text: str | None) -> list[Network]:
    """``--relay-networks``: comma-separated networks; ValueError names a bad one."""
    if not text:
        return []
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"--relay-networks: not a network: {item!r}") from None
    return networks


def in_networks(host: str, networks: list) -> bool:
    """Whether a peer address (IPv4-mapped IPv6 counted as IPv4) is in one of ``networks``."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def relay_possible(settings: Any) -> bool:
    """Whether anyone may relay (so the master runs a queue runner)."""
    return bool(settings.relay_networks) or settings.users is not None
