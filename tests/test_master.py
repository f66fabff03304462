"""The master's worker management, end to end: real servers, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from harness import Client, free_port, wait_until, with_sitecustomize
from test_operations import ConfigLine



def metric(port: int, name: str) -> str:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20).read().decode()
    return "\n".join(line for line in body.splitlines() if line.startswith(name))


# ------------------------------------------------------------ worker slots
@pytest.mark.slow
def test_largest_pool_survives_ttin_and_a_reload(start_server):
    server = start_server(workers=128)
    server.proc.send_signal(signal.SIGTTIN)  # past the documented 1..128
    wait_until(lambda: "workers: 129 refused" in server.log_text(), what="TTIN refused in the log")
    cfg = ConfigLine(server.config_port)
    cfg.sock.settimeout(120)
    old = set(server.worker_pids())
    assert cfg.send("reload=1") == ["OK"]  # two generations of 128 fit
    assert server.proc.poll() is None
    wait_until(lambda: not old & set(server.worker_pids()), timeout=120, what="the old generation to leave")
    server.wait_ready(workers=128)
    assert cfg.show()["workers"] == 128
    assert server.client().cmd("NOOP")[0] == 250
    assert "Traceback" not in server.log_text() + server.output()


# ------------------------------------------------------- errors in the loop
FAULTY_MASTER = """
import os, sys
from prefork_smtpd import master

calls = 0
real = master.Master.manage_workers

def manage_workers(self):
    # A fault the test switches on and off with a file: a bug in the loop.
    global calls
    if os.path.exists("fault"):
        calls += 1
        with open("fault-calls", "w") as f:
            f.write(str(calls))
        raise RuntimeError("injected fault")
    return real(self)

master.Master.manage_workers = manage_workers
from prefork_smtpd.cli.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_error_in_the_master_loop_is_logged_and_survived(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port, config_port = free_port(), free_port()
    out = open(root / "stderr.txt", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", FAULTY_MASTER, "--workers", "1", "-l", "127.0.0.1", "-P", str(port),
         "-c", str(config_port), "--mail-dir", "mail_dir", "--log-file", "log.txt"],
        cwd=root, stdout=out, stderr=subprocess.STDOUT,
    )
    log = root / "log.txt"
    try:
        wait_until(lambda: log.exists() and "worker 1: accepting connections" in log.read_text(), what="a worker")
        (root / "fault").touch()
        os.kill(proc.pid, signal.SIGTTIN)  # wakes the loop; manage_workers now fails
        wait_until(lambda: "RuntimeError: injected fault" in log.read_text(), what="the traceback in the log")
        text = log.read_text()
        assert "Traceback (most recent call last)" in text and "in manage_workers" in text
        wait_until(lambda: "manage_workers failed again" in log.read_text(), what="a retry")
        assert proc.poll() is None
        c = Client(port)  # the worker still serves
        assert c.cmd("NOOP")[0] == 250
        for _ in range(20):  # each signal wakes the loop: a paused step must stay paused
            os.kill(proc.pid, signal.SIGUSR2)
        calls = int((root / "fault-calls").read_text())
        # retried after 0.1, 0.2, 0.4 ... 5 s: a handful of calls, where a hot loop makes thousands
        assert calls < 20, calls
        (root / "fault").unlink()
        wait_until(lambda: "manage_workers works again" in log.read_text(), timeout=30, what="recovery")
        wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2, what="the TTIN worker")
        c.cmd("QUIT")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children():
                child.kill()
            proc.kill()
            proc.wait()
        out.close()


# ------------------------------------------------------------- readiness
# Loaded by the server's interpreter at start (PYTHONPATH): a worker's title
# that says it accepts takes half a second to set, as a preempted worker's may.
SLOW_TITLE = """
import time
import setproctitle as _module
_set = _module.setproctitle
def _slow(title):
    if "connections]" in title:
        time.sleep(0.5)
    _set(title)
_module.setproctitle = _slow
"""


def test_after_a_reload_is_answered_the_new_workers_titles_say_they_accept(start_server, tmp_path):
    # The master answers once every new worker says it accepts (shared
    # memory); a worker that said so before its title did could be seen,
    # right after the OK, with the "(starting)" title still.
    server = start_server(workers=1, env=with_sitecustomize(tmp_path / "site", SLOW_TITLE))
    old = set(server.worker_pids())
    cfg = ConfigLine(server.config_port)
    cfg.sock.settimeout(60)
    assert cfg.send("reload=1") == ["OK"]
    assert set(server.accepting_workers()) - old  # at once, not after some wait


# New workers fail at start while the file NEW_WORKERS_FAIL names exists.
FAIL_NEW_WORKERS = """
import os
import setproctitle as _module
_set = _module.setproctitle
def _failing(title):
    marker = os.environ["NEW_WORKERS_FAIL"]
    if ": worker " in title and title.endswith("(starting)") and os.path.exists(marker):
        raise RuntimeError("this worker cannot start while " + marker + " exists")
    _set(title)
_module.setproctitle = _failing
"""


@pytest.mark.slow
def test_reload_is_answered_only_once_the_new_workers_accept(start_server, tmp_path):
    marker = tmp_path / "new-workers-fail"
    server = start_server(workers=2, env=with_sitecustomize(tmp_path / "site", FAIL_NEW_WORKERS, NEW_WORKERS_FAIL=str(marker)))
    old = set(server.worker_pids())
    marker.touch()  # from now on, new workers cannot start
    cfg = ConfigLine(server.config_port)
    cfg.sock.sendall(b"reload=1\r\n")
    wait_until(lambda: server.log_file.read_text().count("died: exit code 1") >= 3, timeout=60, what="new workers failing")
    assert "this worker cannot start while" in server.log_file.read_text()  # each says why
    cfg.sock.setblocking(False)
    try:
        early = cfg.sock.recv(100)
    except BlockingIOError:
        early = b""
    cfg.sock.setblocking(True)
    assert early == b"", early  # no OK while the new workers fail
    assert old <= set(server.accepting_workers())  # the old generation keeps serving
    assert server.client().cmd("NOOP")[0] == 250
    marker.unlink()  # the cause is gone: the next attempt starts
    cfg.sock.settimeout(60)  # after a backoff of up to MAX_BACKOFF
    assert cfg.file.readline() == b"OK\r\n"
    new = set(server.accepting_workers()) - old
    assert len(new) == 2
    wait_until(lambda: not old & set(server.worker_pids()), what="old workers to leave")


def test_a_child_reaped_while_the_harness_looks_leaves_the_others_listed(start_server, monkeypatch):
    # After a reload's OK the old workers exit and the master reaps them at
    # once: one can vanish between the listing of the master's children and
    # the look at its state. The harness must still see the new workers (it
    # once saw none, and a reload test failed for a harness reason).
    server = start_server(workers=2)
    first, second = sorted(server.worker_pids())
    status = psutil.Process.status

    def reaped_meanwhile(process: psutil.Process) -> str:
        if process.pid == first:
            raise psutil.NoSuchProcess(first)
        return status(process)

    monkeypatch.setattr(psutil.Process, "status", reaped_meanwhile)
    assert server.worker_pids() == [second]
    assert server.accepting_workers() == [second]


# ------------------------------------------------------------------ crashes
def test_a_killed_worker_leaves_no_per_address_count_and_keeps_its_restarts(start_server):
    metrics_port = free_port()
    server = start_server("--max-connections-per-ip", "2", "--metrics-port", str(metrics_port), workers=1)
    (victim,) = server.worker_pids()
    held = [server.client(), server.client()]  # the per-address limit, all in one worker
    refused = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    assert refused.recv(200).startswith(b"421 4.7.0")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in server.worker_pids() and len(server.accepting_workers()) == 1,
               what="a replacement")
    for c in held:
        assert c.closed_by_server()  # its worker is gone
    # The dead worker's connections are gone: the address is not locked out.
    fresh = [server.client(), server.client()]
    assert all(c.greeting[0] == 220 for c in fresh)
    assert 'smtpd_worker_restarts_total{worker="1"} 1.0' in metric(metrics_port, "smtpd_worker_restarts_total")
    (second,) = server.worker_pids()
    for c in fresh:
        c.close()
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: second not in server.worker_pids() and len(server.accepting_workers()) == 1,
               what="another replacement")
    assert 'smtpd_worker_restarts_total{worker="1"} 2.0' in metric(metrics_port, "smtpd_worker_restarts_total")


# ------------------------------------------------------------------ stopping
@pytest.mark.slow
def test_graceful_stop_refuses_new_clients_at_once_on_every_port(start_server):
    submission_port = free_port()
    server = start_server("--graceful-timeout", "120", "--submission-port", str(submission_port))
    busy = server.client()
    busy.cmd("EHLO x"); busy.cmd("MAIL FROM:<a@smtpd.com>"); busy.cmd("RCPT TO:<r>"); busy.cmd("DATA")
    idle = Client(submission_port)
    idle.cmd("EHLO y")
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: server.log_count("stopping: no new connections") == 2, what="workers to stop accepting")

    def refused(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    for port in (server.port, submission_port):
        wait_until(lambda port=port: refused(port), what=f"new connections to port {port} to be refused")
    assert idle.reply() == (421, "4.3.2 mx.test Service shutting down")  # between transactions: closed now
    busy.send(b"the last mail\r\n.\r\n")
    assert busy.reply()[0] == 250
    assert server.proc.wait(timeout=60) == 0
    assert len(server.stored("r")) == 1


# ------------------------------------------------------------------ start-up
def run_server(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "prefork_smtpd", "--workers", "1", "-c", str(free_port()), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )


def test_a_busy_port_exits_2_naming_the_socket(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_server(tmp_path, "-l", "127.0.0.1", "-P", str(port))
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1 port {port}" in r.stderr and "Address already in use" in r.stderr


def test_a_bad_listen_address_exits_2_naming_it(tmp_path):
    r = run_server(tmp_path, "-l", "192.0.2.1", "-P", str(free_port()))  # not on this host
    assert r.returncode == 2, r.stderr
    assert "cannot listen on 192.0.2.1 port" in r.stderr


def test_a_busy_config_port_exits_2_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_server(tmp_path, "-l", "127.0.0.1", "-P", str(free_port()), "-c", str(port))
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on the config port 127.0.0.1 port {port}" in r.stderr


def test_titles_name_the_port_and_the_log_counts_right(start_server):
    server = start_server(workers=1)
    title = " ".join(psutil.Process(server.proc.pid).cmdline()).strip()
    assert title == f"prefork-smtpd: master [127.0.0.1 port {server.port}]"
    assert "connections]" in " ".join(psutil.Process(server.worker_pids()[0]).cmdline())
    assert f"listening on port {server.port} with 1 worker," in server.log_text()
