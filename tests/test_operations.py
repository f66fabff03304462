"""Live operation: the config port, the two client programs, Prometheus."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Client, free_port, wait_until

SHOW_LINE = re.compile(r"([a-z_]+)=(-?[0-9]+)(?: \((default|file|flag|live|queue)\))?\Z")  # source: see README


class ConfigLine:
    """A raw config-port connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, message: bytes | str) -> list[str]:
        if isinstance(message, str):
            message = message.encode()
        self.sock.sendall(message + b"\r\n")
        lines = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), line
            lines.append(line[:-2].decode())
            if lines[-1] == "OK" or lines[-1].startswith("ERR"):
                return lines

    def show(self) -> dict[str, int]:
        return {name: value for name, (value, _) in self.show_sources().items()}

    def show_sources(self) -> dict[str, tuple[int, str]]:
        """``show=1`` as name -> (value, source)."""
        lines = self.send("show=1")
        assert lines[-1] == "OK"
        matches = [SHOW_LINE.match(line) for line in lines[:-1]]
        assert all(matches), lines
        return {m.group(1): (int(m.group(2)), m.group(3)) for m in matches}


def tool(name: str, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    module = {"config": "prefork_smtpd.cli.config_client", "metrics": "prefork_smtpd.cli.metrics"}[name]
    return subprocess.run(
        [sys.executable, "-P", "-m", module, *args], input=input, capture_output=True, text=True, timeout=timeout
    )


def test_logging_switch_and_logger_alias(server):
    cfg = ConfigLine(server.config_port)
    assert cfg.send("logging=0") == ["OK"]
    c = server.client()
    c.cmd("EHLO hidden-client")
    assert c.mail("a@smtpd.com", ["x"], b"hi")[0] == 250
    c.cmd("QUIT")
    assert cfg.send("LOGGER=1") == ["OK"]
    c = server.client()
    c.cmd("EHLO visible-client")
    c.cmd("QUIT")
    wait_until(lambda: "visible-client" in server.log_text(), what="log line")
    assert "hidden-client" not in server.log_text()
    assert server.stop() == 0
    log = server.log_text()
    assert "Server Initialized" in log and "Server Shutting Down" in log


def test_limits_apply_live(server):
    cfg = ConfigLine(server.config_port)
    assert cfg.send("max_message_size=2048") == ["OK"]
    assert cfg.send("Max_Recipients=2") == ["OK"]
    c = server.client()
    assert "SIZE 2048" in c.cmd("EHLO x")[1]
    c.cmd("MAIL FROM:<a@smtpd.com>")
    assert [c.cmd(f"RCPT TO:<r{i}>")[0] for i in range(3)] == [250, 250, 452]
    c.cmd("DATA")
    c.send(b"z" * 900 + b"\r\n" + b"z" * 900 + b"\r\n" + b"z" * 900 + b"\r\n.\r\n")
    assert c.reply()[0] == 552
    assert cfg.send("timeout=1") == ["OK"]
    wait_until(lambda: "timeout=1" in server.log_text(), what="config logged")
    idle = server.client()
    idle.sock.settimeout(10)
    assert idle.reply()[0] == 421
    assert cfg.show()["timeout"] == 1


def test_max_connections_live(server):
    cfg = ConfigLine(server.config_port)
    assert cfg.send("max_connections=3") == ["OK"]
    wait_until(lambda: cfg.show()["max_connections"] == 3)
    held = [server.client() for _ in range(3)]
    assert all(c.greeting[0] == 220 for c in held)
    extra = Client.__new__(Client)
    extra.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    extra.file = extra.sock.makefile("rb")
    code, text = extra.reply()
    assert code == 421 and text.startswith("4.7.0")
    assert extra.closed_by_server()
    assert held[0].xstat("CURRENT") == 3


@pytest.mark.slow
def test_workers_grow_and_shrink_gracefully(server):
    cfg = ConfigLine(server.config_port)
    assert cfg.send("workers=3") == ["OK"]
    server.wait_ready(workers=3)
    # Find a client served by worker 3, the one that will leave.
    leaving = None
    for _ in range(60):
        c = server.client()
        pid = owner_of(server, c)
        if "worker 3 " in psutil.Process(pid).cmdline()[0]:
            leaving = c
            break
    assert leaving is not None, "no connection reached worker 3"
    leaving.cmd("EHLO x"); leaving.cmd("MAIL FROM:<a@smtpd.com>"); leaving.cmd("RCPT TO:<shrink>"); leaving.cmd("DATA")
    assert cfg.send("workers=2") == ["OK"]
    wait_until(lambda: "stopping: no new connections" in server.log_text(), what="worker 3 to stop accepting")
    leaving.send(b"still delivered\r\n.\r\n")
    assert leaving.reply()[0] == 250
    assert leaving.cmd("NOOP")[0] == 250  # a leaving worker lets the session run to its end
    assert len(server.worker_pids()) == 3
    assert leaving.cmd("QUIT")[0] == 221
    wait_until(lambda: len(server.worker_pids()) == 2, what="worker 3 to exit")
    assert len(server.stored("shrink")) == 1
    assert cfg.show()["workers"] == 2


def owner_of(server, client) -> int:
    port = client.sock.getsockname()[1]
    for pid in server.worker_pids():
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.raddr and conn.raddr.port == port:
                return pid
    raise AssertionError("no worker holds the connection")


@pytest.mark.parametrize(
    "message, reason",
    [
        (b"logging=yes", "ERR logging: value must be an integer"),
        (b"timeout=-5", "ERR timeout must be between 1 and 86400"),
        (b"workers=100000", "ERR workers must be between 1 and 128"),
        (b"max_recipients=1.5", "ERR max_recipients: value must be an integer"),
        (b"max_recipients=99999999999999999999", "ERR max_recipients must be between 1 and 100000"),
        (b"logging=-99999999999999999999",
         "ERR logging must be between -9223372036854775808 and 9223372036854775807"),
        (b"colour=3", "ERR unknown parameter colour"),
        (b"logging", "ERR expected <param>=<integer>"),
        (b"x" * 5000, "ERR line too long"),
        (b"\xff\xfe\x00junk=1", "ERR not ASCII text"),
    ],
)
def test_bad_config_messages_change_nothing(server, message, reason):
    cfg = ConfigLine(server.config_port)
    before = cfg.show()
    assert cfg.send(message) == [reason]
    assert cfg.show() == before  # and the connection is still usable


def test_quit_and_many_clients_at_once(server):
    stuck = socket.create_connection(("127.0.0.1", server.config_port))
    stuck.sendall(b"show=1\r\n" * 20000)  # never reads its replies
    clients = [ConfigLine(server.config_port) for _ in range(30)]
    for cfg in clients:
        assert cfg.send("logging=1") == ["OK"]
    cfg = clients[0]
    cfg.sock.sendall(b"QUIT\r\n")
    assert cfg.file.readline() == b"OK\r\n"
    assert cfg.file.readline() == b""
    assert server.client().cmd("NOOP")[0] == 250  # the master still serves
    stuck.close()


def test_config_secret(start_server, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("123456789\n")
    server = start_server("--config-secret-file", str(secret))
    cfg = ConfigLine(server.config_port)
    assert cfg.send("show=1")[0].startswith("ERR authentication required")
    assert cfg.send("token=1") == ["ERR bad token"]
    assert cfg.send("token=123456789") == ["OK"]  # two failures: under the limit of 3
    assert cfg.send("logging=0") == ["OK"]
    ok = tool("config", "-P", str(server.config_port), "--secret-file", str(secret), "logging=1")
    assert ok.returncode == 0, ok.stderr
    refused = tool("config", "-P", str(server.config_port), "logging=1")
    assert refused.returncode == 1


def test_non_loopback_config_needs_a_secret(tmp_path):
    r = subprocess.run(
        [sys.executable, "-P", "-m", "prefork_smtpd", "-C", "0.0.0.0", "-P", str(free_port())],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )
    assert r.returncode == 2 and "--config-secret-file is required" in r.stderr


def test_config_client_one_shot_interactive_and_unreachable(server):
    port = str(server.config_port)
    r = tool("config", "-P", port, "logging=0", "max_recipients=7")
    assert r.returncode == 0 and r.stdout.splitlines() == ["logging=0: OK", "max_recipients=7: OK"]
    r = tool("config", "-P", port, "max_errors=3", "bogus=1", "timeout=9")
    assert r.returncode == 1 and "bogus=1: ERR unknown parameter bogus" in r.stdout
    cfg = ConfigLine(server.config_port)
    assert cfg.show()["max_errors"] == 3 and cfg.show()["timeout"] == 9  # applied in order, past the error
    r = tool("config", "-P", port, input="help\nworkers=3\nnonsense\nquit\n")
    assert r.returncode == 0
    assert "max_recipients" in r.stdout and "now 7" in r.stdout
    assert "OK" in r.stdout and "ERR expected <param>=<integer>" in r.stdout
    server.wait_ready(workers=3)
    r = tool("config", "-P", str(free_port()), "logging=1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot reach" in r.stderr
    assert tool("config", "-h").returncode == 0 and "show=1" in tool("config", "-h").stdout


def test_metrics_netstat_matches_xstat_under_load(start_server):
    server = start_server(workers=4)
    held = [server.client() for _ in range(50)]
    for c in held[:5]:
        c.cmd("EHLO x")
        assert c.mail("a@smtpd.com", ["m"], b"hello")[0] == 250
    r = tool("metrics", "-P", str(server.port), "-n", "--once", "--json")
    assert r.returncode == 0, r.stderr
    sample = json.loads(r.stdout)
    assert sample["status"] == "Online"
    assert sample["current"] == sample["os_established"] == 51  # 50 held + the monitor's own
    assert sample["difference"] == 0 and sample["clients"] == 50
    assert sample["mails"] == 5 and sample["bytes"] == 5 * len(b"hello\r\n")
    assert sample["delay_ms"] > 0


def test_metrics_reconnects_and_reports_rates(start_server, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "prefork_smtpd.cli.metrics", "-P", str(port), "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        first = json.loads(proc.stdout.readline())
        assert first["status"] == "Unreachable"
        server = start_server("-P", str(port), workers=1)
        server.port = port  # the later -P wins over the harness's own
        while json.loads(proc.stdout.readline())["status"] != "Online":
            pass
        c = server.client()
        c.cmd("EHLO x")
        for _ in range(5):
            c.mail("a@smtpd.com", ["rate"], b"x")
        while True:
            s = json.loads(proc.stdout.readline())
            if s.get("mails") == 5 and s.get("mails_per_s") is not None:
                break
        assert "bytes_per_s" in s
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    r = tool("metrics", "-P", str(free_port()), "--once")
    assert r.returncode == 1 and "Unreachable" in r.stdout


def test_prometheus_endpoint_matches_xstat(start_server):
    mport = free_port()
    server = start_server("--metrics-port", str(mport), workers=2)
    c = server.client()
    c.cmd("EHLO x")
    for i in range(3):
        assert c.mail("a@smtpd.com", ["p"], b"mail %d" % i)[0] == 250
    c.cmd("BOGUS")
    c.cmd("MAIL FROM:<a@elsewhere.org>")
    other = server.client()
    other.cmd("QUIT")
    other.closed_by_server()
    wait_until(lambda: c.xstat("CURRENT") == 1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    metrics = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            metrics[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert metrics[("smtpd_connections_total", ())] == c.xstat("TOTAL") == 2
    assert metrics[("smtpd_connections_current", ())] == c.xstat("CURRENT") == 1
    assert metrics[("smtpd_mails_total", ())] == c.xstat("MAILS") == 3
    assert metrics[("smtpd_received_bytes_total", ())] == c.xstat("BYTES")
    assert metrics[("smtpd_workers", ())] == 2
    per_worker = [v for (name, _), v in metrics.items() if name == "smtpd_worker_connections"]
    assert len(per_worker) == 2 and sum(per_worker) == 1
    assert metrics[("smtpd_rejected_replies_total", (("class", "5xx"),))] == 2  # BOGUS and the foreign sender
    assert metrics[("smtpd_rejected_replies_total", (("class", "4xx"),))] == 0
    c.cmd("RSET")
    c.cmd("MAIL FROM:<a@smtpd.com>")
    assert c.cmd(b"RCPT TO:<x@other.org>")[0] == 550
    assert scrape(mport, "smtpd_rejected_replies_total", (("class", "5xx"),)) == 3
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/other", timeout=10)
    assert err.value.code == 404


def scrape(port: int, name: str, labels: tuple) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and tuple(sorted(sample.labels.items())) == labels:
                return sample.value
    return None



def test_metrics_redraws_in_place_on_a_terminal(server):
    import os
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "prefork_smtpd.cli.metrics", "-P", str(server.port), "--interval", "0.2"],
        stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    seen = b""
    try:
        while seen.count(b"\x1b[H\x1b[2J") < 2:  # two redraws of the same screen
            ready, _, _ = select.select([master], [], [], 20)
            assert ready, f"no output from the monitor: {seen!r}"
            seen += os.read(master, 4096)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        os.close(master)
    screen = seen.rsplit(b"\x1b[H\x1b[2J", 1)[1].decode()
    assert "status               Online" in screen and "delay (NOOP)" in screen
