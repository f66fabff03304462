"""The config port and /metrics under attack, and reload against live changes."""

from __future__ import annotations

import select
import signal
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest

from harness import wait_until
from test_operations import ConfigLine, tool

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def flood_without_reading(port: int, total: int, stall: float = 3.0) -> int:
    """Send ``a\\n`` lines, never reading; stop when sent or the peer stops reading.

    Returns the bytes the kernel took. The peer has stopped reading when the
    socket stays unwritable for ``stall`` seconds.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its replies pile up at the server
    sock.setblocking(False)
    chunk = b"a\n" * 32768
    sent = 0
    try:
        while sent < total:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                if not select.select([], [sock], [], stall)[1]:
                    break
            except OSError:
                break  # closed by the server: bounded too
    finally:
        flood_without_reading.sockets.append(sock)  # held open: the master keeps it
    return sent


flood_without_reading.sockets = []


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow
def test_a_flood_that_never_reads_keeps_the_master_small(server):
    before = rss(server.proc.pid)
    sent = flood_without_reading(server.config_port, 20 * MiB)
    grown = rss(server.proc.pid) - before
    print(f"flood: {sent} bytes taken, master RSS {before / MiB:.1f} MiB -> +{grown / MiB:.2f} MiB")
    assert grown < 8 * MiB, f"the master grew by {grown / MiB:.1f} MiB"
    assert sent < 20 * MiB  # it stopped reading the client that does not read
    operator = ConfigLine(server.config_port)  # the loop still serves everyone else
    assert operator.show()["max_recipients"] == 100
    assert server.client().cmd("NOOP")[0] == 250
    for sock in flood_without_reading.sockets:
        sock.close()


def secret_file(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("with_secret", [False, True])
def test_idle_junk_connections_never_lock_out_the_operator(start_server, tmp_path, with_secret):
    from harness import free_port, raise_fd_limit

    raise_fd_limit(4096)
    mport = free_port()
    flags = ["--metrics-port", str(mport)]
    if with_secret:
        flags += ["--config-secret-file", str(secret_file(tmp_path, "31337"))]
    server = start_server(*flags)
    operator = None
    if with_secret:  # logged in before the junk: junk must not push it out
        operator = ConfigLine(server.config_port)
        assert operator.send("token=31337") == ["OK"]
    junk = [socket.create_connection(("127.0.0.1", p)) for p in (server.config_port, mport) for _ in range(100)]
    junk[0].sendall(b"max_")  # half a line, no more
    late = ConfigLine(server.config_port)
    if with_secret:
        assert late.send("token=31337") == ["OK"]
    assert late.show()["workers"] == 2
    if operator is not None:
        assert operator.show()["workers"] == 2
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
    assert b"smtpd_connections_total" in body
    for sock in junk:
        sock.close()


def test_failed_logins_are_logged_and_close_the_connection(start_server, tmp_path):
    server = start_server("--config-secret-file", str(secret_file(tmp_path, "424242")))
    cfg = ConfigLine(server.config_port)
    assert cfg.send("token=1") == ["ERR bad token"]
    assert cfg.send("token=2") == ["ERR bad token"]
    assert cfg.send("token=3") == ["ERR bad token; too many failed logins, closing"]
    assert cfg.file.readline() == b""
    wait_until(lambda: server.log_count("config: failed login from 127.0.0.1:") == 3, what="three log lines")
    assert "(3 of 3 on this connection)" in server.log_text()
    ok = ConfigLine(server.config_port)  # the address has budget left: the right token works
    assert ok.send("token=424242") == ["OK"]


def test_failed_logins_spend_the_address_budget(start_server, tmp_path):
    server = start_server(
        "--config-secret-file", str(secret_file(tmp_path, "424242")), "--config-login-failures-per-minute", "3"
    )
    first = ConfigLine(server.config_port)
    for _ in range(2):
        assert first.send("token=5") == ["ERR bad token"]
    second = ConfigLine(server.config_port)
    assert second.send("logging=0")[0].startswith("ERR authentication required")
    third = ConfigLine(server.config_port)  # the right token, but the address spent its budget
    assert third.send("token=424242") == ["ERR too many failed logins from your address; try again later"]
    assert third.file.readline() == b""
    for _ in range(3):
        ConfigLine(server.config_port).send("token=7")
    wait_until(lambda: "out of failed logins" in server.log_text(), what="the refusal logged")
    assert server.log_count("out of failed logins") == 1  # once, not once per try
    assert server.log_count("config: failed login") == 3


@pytest.mark.slow
def test_login_and_idle_timeouts(start_server, tmp_path):
    from harness import free_port

    mport = free_port()
    server = start_server(
        "--config-secret-file", str(secret_file(tmp_path, "99")), "--config-login-timeout", "1",
        "--config-idle-timeout", "8", "--metrics-port", str(mport), "--metrics-timeout", "1",
    )
    silent = ConfigLine(server.config_port)
    logged_in = ConfigLine(server.config_port)
    assert logged_in.send("token=99") == ["OK"]
    scraper = socket.create_connection(("127.0.0.1", mport), timeout=20)
    silent.sock.settimeout(20)
    assert silent.file.readline() == b"ERR closed: not logged in within 1 s\r\n"
    assert silent.file.readline() == b""
    assert scraper.makefile("rb").readline().startswith(b"HTTP/1.1 408")
    assert logged_in.show()["workers"] == 2  # still in: it is not silent
    logged_in.sock.settimeout(30)
    assert logged_in.file.readline() == b"ERR closed: silent for 8 s\r\n"
    assert logged_in.file.readline() == b""
    wait_until(lambda: "config port: 1 connection not logged in within 1 s" in server.log_text(), what="logged")
    wait_until(lambda: "config port: 1 connection silent for 8 s" in server.log_text(), what="idle timeout logged")
    wait_until(lambda: "metrics: 1 connection sent no request within 1 s" in server.log_text(), what="logged")


@pytest.mark.slow
def test_a_client_waiting_for_its_reload_buffers_nothing(server):
    """Lines sent while a reload runs stay in the socket, not in the master."""
    cfg = ConfigLine(server.config_port)
    before = rss(server.proc.pid)
    cfg.sock.sendall(b"reload=1\r\n")
    cfg.sock.setblocking(False)
    sent = 0
    try:
        while sent < 20 * MiB:
            try:
                sent += cfg.sock.send(b"show=1\n" * 8192)
            except BlockingIOError:
                if not select.select([], [cfg.sock], [], 3)[1]:
                    break
    finally:
        cfg.sock.setblocking(True)
    assert rss(server.proc.pid) - before < 8 * MiB


def test_secret_zero_is_a_secret(start_server, tmp_path):
    secret = secret_file(tmp_path, "0")
    server = start_server("--config-secret-file", str(secret))
    cfg = ConfigLine(server.config_port)
    assert cfg.send("show=1")[0].startswith("ERR authentication required")
    assert cfg.send("token=1") == ["ERR bad token"]
    assert cfg.send("token=0") == ["OK"]
    assert cfg.show()["workers"] == 2
    assert tool("config", "-P", str(server.config_port), "show=1").returncode == 1
    r = tool("config", "-P", str(server.config_port), "--secret-file", str(secret), "show=1")
    assert r.returncode == 0 and "workers=2 (flag)" in r.stdout
    conf = tmp_path / "client.toml"
    conf.write_text(f'config-port = {server.config_port}\nconfig_secret_file = "{secret}"\n')
    r = tool("config", "--config", str(conf), "show=1")
    assert r.returncode == 0 and "workers=2 (flag)" in r.stdout, r.stdout + r.stderr


def write_toml(path: Path, **values) -> Path:
    path.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items()))
    return path


def test_reload_keeps_live_changes_unless_the_file_changed_them(start_server, tmp_path):
    conf = write_toml(tmp_path / "s.toml", max_recipients=100, timeout=300, max_errors=20)
    server = start_server("--config", str(conf), "--data-timeout", "500")
    cfg = ConfigLine(server.config_port)
    sources = cfg.show_sources()
    assert sources["max_recipients"] == (100, "file")
    assert sources["data_timeout"] == (500, "flag")
    assert sources["max_connections"] == (50000, "default")
    for message in ("max_recipients=2", "workers=3", "logging=7", "timeout=9", "data_timeout=7"):
        assert cfg.send(message) == ["OK"]
    server.wait_ready(workers=3)
    assert cfg.send("reload=1") == ["OK"]
    after = cfg.show_sources()
    assert after["max_recipients"] == (2, "live")
    assert after["workers"] == (3, "live")
    assert after["logging"] == (7, "live")
    assert after["timeout"] == (9, "live")
    assert after["data_timeout"] == (7, "live")
    server.wait_ready(workers=3)
    c = server.client()  # served by the new generation, with the live limit
    c.cmd("EHLO x"); c.cmd("MAIL FROM:<a@smtpd.com>")
    assert [c.cmd(f"RCPT TO:<r{i}>")[0] for i in range(3)] == [250, 250, 452]
    # The file changes max_recipients and max_errors: those win; the rest stays live.
    write_toml(conf, max_recipients=50, timeout=300, max_errors=5)
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: cfg.show_sources()["max_recipients"] == (50, "file"), what="the file's new value")
    after = cfg.show_sources()
    assert after["max_errors"] == (5, "file")
    assert after["timeout"] == (9, "live") and after["workers"] == (3, "live")
    assert "reload: max_recipients=50 from the config replaces the live 2" in server.log_text()
    # A key removed from the file is a change too: back to the default.
    write_toml(conf, timeout=300, max_errors=5)
    assert cfg.send("reload=1") == ["OK"]
    assert cfg.show_sources()["max_recipients"] == (100, "default")


def test_config_client_reads_the_servers_toml(start_server, tmp_path):
    from harness import free_port

    secret = secret_file(tmp_path, "777")
    port = free_port()
    conf = write_toml(
        tmp_path / "s.toml", config_address="0.0.0.0", config_port=port, config_secret_file=str(secret),
        max_recipients=9,
    )
    server = start_server("--config", str(conf), "-c", str(port))  # the later -c wins over the harness's
    server.config_port = port
    r = tool("config", "--config", str(conf), "max_recipients=4", "reload=1", "show=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max_recipients=4 (live)" in r.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text("config_port = [\n")
    r = tool("config", "--config", str(broken), "show=1")
    assert r.returncode == 2 and "broken.toml" in r.stderr


def test_config_tool_refuses_a_toml_that_is_no_regular_file(tmp_path):
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    r = tool("config", "--config", str(fifo), "show=1", timeout=20)  # was: blocked in open() for ever
    assert r.returncode == 2 and "fifo.toml" in r.stderr and "not a regular file" in r.stderr
    r = tool("config", "--config", str(tmp_path), "show=1", timeout=20)
    assert r.returncode == 2 and "directory" in r.stderr.lower()
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'config_address = "\xe9"\n')
    r = tool("config", "--config", str(bad), "show=1", timeout=20)
    assert r.returncode == 2 and "latin1.toml: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


def test_the_unit_reloads_through_the_same_toml_and_help_lists_reload():
    unit = (REPO / "systemd" / "prefork-smtpd.service").read_text()
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    reload = next(line for line in unit.splitlines() if line.startswith("ExecReload="))
    toml = start.split("--config", 1)[1].split()[0]
    assert f"--config {toml}" in reload and reload.endswith("reload=1")
    assert "reload=1" in tool("config", "-h").stdout
    assert "| `reload=1` |" in (REPO / "README.md").read_text()
