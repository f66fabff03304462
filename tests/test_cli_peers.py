"""prefork-smtpd-metrics and prefork-smtpd-config against a peer that is
not what they expect (no SMTP server, no config port, a stalled or hostile
one): a precise message and a bounded wait, never a traceback or a hang."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from prefork_smtpd.cli.metrics import Monitor


class Peer(threading.Thread):
    """Accepts one connection at a time and plays ``script`` to it:
    (bytes to send, seconds to wait after) pairs, then holds it open."""

    def __init__(self, script: list[tuple[bytes, float]]) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.done = threading.Event()

    def run(self) -> None:
        self.listener.settimeout(0.2)
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                for data, pause in self.script:
                    try:
                        conn.sendall(data)
                    except OSError:
                        break
                    if self.done.wait(pause):
                        return
                self.done.wait(30)

    def stop(self) -> None:
        self.done.set()
        self.listener.close()


TRICKLE = [(b"2", 0.5), (b"2", 0.5), (b"0", 0.5)] + [(b"x", 0.5)] * 40  # a byte every half second
GREET = [(b"220 fake ESMTP\r\n", 0)]


@pytest.mark.parametrize("script, says", [
    (GREET + [(b"250 ok\r\n250 ok\r\n" * 8, 0)], "XSTAT"),  # NOOP answered, then XSTAT without counts
    ([(b"HTTP/1.1 400 Bad Request\r\n", 0)], "not an SMTP reply"),
    ([(b"2" * 100_000, 0)], "longer than 4096"),  # one endless line
    (TRICKLE, "no complete reply within 2 s"),
])
def test_a_peer_that_is_no_smtp_server_is_unreachable_with_a_reason(script, says):
    peer = Peer(script)
    peer.start()
    try:
        monitor = Monitor("127.0.0.1", peer.port, False, timeout=2.0)
        started = time.monotonic()
        sample = monitor.sample()
        assert time.monotonic() - started < 10
        assert sample.status == "Unreachable" and says in (sample.error or ""), sample
        monitor.close()
    finally:
        peer.stop()


def test_a_garbage_answer_to_quit_is_no_traceback():
    greeting_then_counts = GREET + [(b"250 ok\r\n", 0.2)] + [(b"250 X: 1\r\n", 0)] * 7 + [(b"\x00garbage\r\n", 0)]
    peer = Peer(greeting_then_counts)
    peer.start()
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "prefork_smtpd.cli.metrics", "-P", str(peer.port), "--once", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert "Traceback" not in done.stderr, done.stderr
    finally:
        peer.stop()


@pytest.mark.parametrize("interval", ["nan", "inf", "1e300", "0", "-1"])
def test_an_interval_that_is_no_usable_number_of_seconds_is_refused(interval):
    done = subprocess.run(
        [sys.executable, "-P", "-m", "prefork_smtpd.cli.metrics", "--interval", interval, "--once"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--interval must be a number of seconds" in done.stderr, done.stderr


@pytest.mark.parametrize("script, says", [
    (TRICKLE, "no complete reply within 2 s"),
    ([(b"O" * 100_000, 0)], "longer than 4096"),
    ([(b"", 0)], "no complete reply within 2 s"),  # silent
])
def test_the_config_client_gives_up_on_a_peer_that_is_no_config_port(script, says):
    from prefork_smtpd.cli.config_client import ConfigConnection, Unreachable

    peer = Peer(script)
    peer.start()
    try:
        conn = ConfigConnection("127.0.0.1", peer.port, timeout=2.0)
        started = time.monotonic()
        with pytest.raises(Unreachable, match=says):
            conn.send("show=1")
        assert time.monotonic() - started < 10
        conn.close()
    finally:
        peer.stop()


@pytest.mark.parametrize("args, says", [
    (["-P", "113562", "show=1"], "is not a port"),
    (["-P", "1", "max_recipients=9\nworkers=999"], "a message holds a line break"),
])
def test_the_config_client_refuses_what_the_port_cannot_take(args, says):
    done = subprocess.run(
        [sys.executable, "-P", "-m", "prefork_smtpd.cli.config_client", *args], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and says in done.stderr, done.stderr
