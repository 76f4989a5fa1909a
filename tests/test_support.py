"""The test helpers' own promises, where a broken helper would make other tests flaky."""

from __future__ import annotations

import socket

from tests.support.processes import free_port


def test_free_ports_are_never_handed_out_twice() -> None:
    # The kernel reuses released ports for bind(0); a topology of many ports picked one after
    # another must still get distinct ones (a cluster once got the same port for two services).
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
