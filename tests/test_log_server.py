"""A log that cannot be written costs a worker at most --max-log-backlog.

The log file is a FIFO the test opens for reading and does not read: once
its pipe is full, every write to the log blocks, as on a stalled disk or
network file system. Clients then make the worker log as fast as it can
(each refused command is a line); its memory must stay near the bound,
other clients must still be served, and once the log is read again it
says how many lines it dropped.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from harness import DOMAIN, free_port, wait_until, with_sitecustomize
from test_log import read_available, stalled_log
from test_resources import MB, MiB, worker_anonymous

BACKLOG = 1 * MiB
MARGIN = 8 * MB  # the worker's own churn under four busy sessions (measured: 0.1 MB)
BAD_COMMANDS = 60_000  # per session; four sessions make ~45 MB of log lines
BAD_COMMAND = b"XBAD " + b"z" * 90 + b"\r\n"  # logged cut at 100 octets: ~180 bytes a line
DROP_LINE = re.compile(rb"worker 1: (\d+) log lines dropped since \d\d:\d\d:\d\d: the log could not be written fast enough")


class RefusedCommands(threading.Thread):
    """One session sending ``count`` unknown commands, pipelined, reading every reply."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.count = count
        self.refusals = 0
        self.stop = threading.Event()

    def run(self) -> None:
        reader = threading.Thread(target=self.read_replies, daemon=True)
        reader.start()
        batch = BAD_COMMAND * 500
        try:
            for _ in range(self.count // 500):
                if self.stop.is_set():
                    break
                self.sock.sendall(batch)
        except OSError:
            pass
        reader.join(120)

    def read_replies(self) -> None:
        self.sock.settimeout(1)
        tail = b""
        while not self.stop.is_set() and self.refusals < self.count:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            data = tail + data
            self.refusals += data.count(b"\r\n500 ")
            tail = data[-5:]  # a reply start split between reads, never one counted twice


def send_mail(server) -> int:
    client = server.client()
    assert client.cmd("EHLO other.example")[0] == 250
    code = client.mail(f"a@{DOMAIN}", [f"bob@{DOMAIN}"], b"Subject: still served\r\n\r\nThe log is stalled.\r\n")[0]
    client.close()
    return code


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_a_log_that_cannot_be_written_costs_the_worker_at_most_the_bound(start_server, tmp_path):
    fifo, reader = stalled_log(tmp_path)
    try:
        metrics_port = free_port()
        server = start_server(
            "--log-file", str(fifo), "--max-log-backlog", str(BACKLOG), "--max-errors", "100000",
            "--metrics-port", str(metrics_port), workers=1,
        )
        before = worker_anonymous(server)
        sessions = [RefusedCommands(server.port, BAD_COMMANDS) for _ in range(4)]
        peak = 0

        def over_or_done() -> bool:
            nonlocal peak
            peak = max(peak, worker_anonymous(server) - before)
            return peak > BACKLOG + MARGIN or not any(s.is_alive() for s in sessions)

        for session in sessions:
            session.start()
        try:
            # In the thick of it, with the log stalled, a mail still gets its 250.
            wait_until(lambda: over_or_done() or sum(s.refusals for s in sessions) > 20_000, timeout=300)
            assert send_mail(server) == 250
            wait_until(over_or_done, timeout=300, interval=0.05, what="the refused commands to be answered")
        finally:
            for session in sessions:
                session.stop.set()
            for session in sessions:
                session.join(30)
        refused = sum(s.refusals for s in sessions)
        print(f"worker anonymous memory growth: {peak / MB:.1f} MB peak after {refused} refused commands")
        assert peak < BACKLOG + MARGIN, f"the worker grew by {peak / MB:.0f} MB behind a stalled log"
        assert refused == 4 * BAD_COMMANDS, "the worker stopped answering"
        assert len(server.stored("bob")) == 1
        assert send_mail(server) == 250  # and after it, the log still stalled
        # logrotate's USR1: the worker reopens its log, without waiting for
        # the old file's blocked writer, and serves on.
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGUSR1)
        assert send_mail(server) == 250
        assert len(server.stored("bob")) == 3

        # The log is read again: the worker's writer catches up, and its
        # next tick logs how many lines were lost.
        received = bytearray()

        def drop_line() -> re.Match | None:
            received.extend(read_available(reader))
            return DROP_LINE.search(received)

        match = wait_until(drop_line, timeout=60, interval=0.1, what="the drop line")
        dropped = int(match.group(1))
        assert dropped > refused // 2, f"only {dropped} of {refused} lines dropped: the bound let most through"
        logged = received.count(b'refused "XBAD ')
        # Every refusal is either in the log or in the count; the count also
        # holds a few lines of the two mail sessions, dropped alike.
        assert refused <= logged + dropped <= refused + 20, f"{logged} logged + {dropped} dropped, {refused} refused"
        assert metric(metrics_port, "smtpd_log_lines_dropped_total") == dropped
    finally:
        os.close(reader)


@pytest.mark.slow
def test_a_log_that_cannot_be_written_never_stops_the_master(start_server, tmp_path):
    """The master hands its lines to a writer thread: with its log stalled it
    still answers the config port and replaces a dead worker, and once the
    log is read again it says how many of its lines it dropped."""
    from test_operations import ConfigLine

    fifo, reader = stalled_log(tmp_path)
    try:
        server = start_server("--log-file", str(fifo), "--max-log-backlog", str(64 * 1024), workers=1)
        config = ConfigLine(server.config_port)  # 10 s per reply: a blocked master fails it
        # Each change is a line of the master's ("config: max_recipients=N"):
        # 4,000 of them are 4 times the pipe and the backlog together.
        for n in range(4000):
            assert config.send(f"max_recipients={50 + n % 2}") == ["OK"]
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: server.accepting_workers() and server.worker_pids() != [worker], timeout=60,
                   what="a new worker, the log still stalled")
        assert config.send("max_recipients=60") == ["OK"]
        received = bytearray()

        def drop_line() -> re.Match | None:
            received.extend(read_available(reader))
            return re.search(rb"\d\d : (\d+) log lines dropped since \d\d:\d\d:\d\d", received)

        match = wait_until(drop_line, timeout=60, interval=0.1, what="the master's drop line")
        assert int(match.group(1)) > 1000
        # Read again, the log takes the master's lines as they come.
        assert config.send("max_recipients=61") == ["OK"]
        wait_until(lambda: received.extend(read_available(reader)) or b"config: max_recipients=61" in received,
                   timeout=60, interval=0.1, what="a line after the drop")
    finally:
        os.close(reader)


def test_a_config_port_answer_comes_after_the_masters_line_for_it(start_server, tmp_path):
    """The master writes its log from a thread; a config port answer still
    waits for the line of its change, so a script that reads the log after
    an answer finds it. Read through a FIFO: what the master had written
    when the answer came is exactly what the pipe holds."""
    from test_operations import ConfigLine

    fifo, reader = stalled_log(tmp_path)
    try:
        server = start_server("--log-file", str(fifo), workers=1)
        config = ConfigLine(server.config_port)
        received = bytearray()
        for n in range(40):
            assert config.send(f"max_recipients={100 + n}") == ["OK"]
            received.extend(read_available(reader))
            assert f"config: max_recipients={100 + n}\n".encode() in received, f"answer {n} came before its line"
    finally:
        os.close(reader)


# A worker that crashes once its log is open, when the flag file exists.
CRASH_ONCE_SERVING = """
import os
import prefork_smtpd.worker as worker

serve = worker.Worker.serve

async def crashing_serve(self):
    if os.path.exists(os.environ["CRASH_FLAG"]):
        self.log("about to crash")
        raise RuntimeError("injected crash")
    await serve(self)

worker.Worker.serve = crashing_serve
"""


@pytest.mark.slow
def test_a_worker_crash_after_its_log_is_open_is_in_the_log(start_server, tmp_path):
    """The worker closes its own log on the way out, so the crash line its
    child code writes next found the logger without a handler and went to
    stderr, not the log file: the line that says why a worker died."""
    flag = tmp_path / "crash"
    server = start_server(workers=1, env=with_sitecustomize(tmp_path / "site", CRASH_ONCE_SERVING, CRASH_FLAG=str(flag)))
    flag.touch()  # from now on, a new worker crashes once its log is open
    (first,) = server.worker_pids()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: server.log_count("exit code 1; replacing it") >= 1, timeout=60, what="a crashed worker reaped")
    log = server.log_text()
    assert "worker 1: about to crash" in log
    assert re.search(r"\d\d : worker 1 crashed: Traceback.*\n(.*\n)*RuntimeError: injected crash\n", log), log[-2000:]


@pytest.mark.slow
def test_a_worker_that_crashes_while_the_log_is_stalled_still_exits(start_server, tmp_path):
    """A worker with lines for a stalled log that crashes: it gives its
    writer a bounded moment, then exits, so the master reaps and replaces
    it. (It waited for its writer forever: a dead worker that never died,
    its slot never given to a new one.)"""
    from test_operations import ConfigLine

    flag = tmp_path / "crash"
    env = with_sitecustomize(tmp_path / "site", CRASH_ONCE_SERVING, CRASH_FLAG=str(flag))
    fifo, reader = stalled_log(tmp_path)
    try:
        server = start_server("--log-file", str(fifo), "--max-log-backlog", str(64 * 1024), workers=1, env=env)
        config = ConfigLine(server.config_port)
        for n in range(4000):  # the master's lines fill the pipe: every write to the log now blocks
            assert config.send(f"max_recipients={50 + n % 2}") == ["OK"]
        flag.touch()
        (first,) = server.worker_pids()
        os.kill(first, signal.SIGKILL)
        crashing = wait_until(lambda: [p for p in server.worker_pids() if p != first], timeout=60,
                              what="the replacement worker, which crashes")[0]
        wait_until(lambda: crashing not in server.worker_pids(), timeout=60,
                   what="the crashed worker to exit and be reaped, the log still stalled")
        wait_until(lambda: [p for p in server.worker_pids() if p not in (first, crashing)], timeout=60,
                   what="the next worker forked in its place")
        assert config.send("max_recipients=60") == ["OK"]
    finally:
        os.close(reader)


# The master's first write to its log takes a second, as on a slow disk.
SLOW_FIRST_MASTER_WRITE = """
import threading
import time
import prefork_smtpd.log as log

write = log.AppendLineHandler._write
slowed = []

def slow_write(self, data):
    if self.prefix == "" and threading.current_thread().name == "log-writer" and not slowed:
        slowed.append(data)
        time.sleep(1.0)
    write(self, data)

log.AppendLineHandler._write = slow_write
"""


@pytest.mark.slow
def test_the_startup_lines_are_in_the_log_before_a_worker_serves(start_server, tmp_path):
    """'Server Initialized' is in the log before any worker accepts, as when
    the master wrote each line at once: its writer thread was handed the
    line only after the workers were forked."""
    server = start_server(workers=1, env=with_sitecustomize(tmp_path / "site", SLOW_FIRST_MASTER_WRITE))
    log = server.log_text()  # start_server returned: the worker accepts
    assert log.split("\n")[0].endswith(" : Server Initialized"), log
    assert " : listening on port " in log.split("\n")[1], log


@pytest.mark.slow
def test_a_reload_while_the_log_is_stalled_lets_the_old_workers_go(start_server, tmp_path):
    """After reload=1 the old workers finish and exit even though their log
    cannot be written: each gives its writer a bounded moment. (They waited
    for it forever, so the old generation never left.)"""
    from test_operations import ConfigLine

    fifo, reader = stalled_log(tmp_path)
    try:
        server = start_server("--log-file", str(fifo), "--max-log-backlog", str(64 * 1024), workers=2)
        config = ConfigLine(server.config_port)
        for n in range(4000):  # the master's lines fill the pipe: every write to the log now blocks
            assert config.send(f"max_recipients={50 + n % 2}") == ["OK"]
        old = set(server.worker_pids())
        for _ in range(4):  # a session line for the workers to write on their way out
            client = server.client()
            client.cmd("EHLO client.test")
            client.cmd("QUIT")
        assert config.send("reload=1") == ["OK"]
        wait_until(lambda: not old & set(server.worker_pids()), timeout=60,
                   what="the old generation to exit, the log still stalled")
        wait_until(lambda: len(server.accepting_workers()) == 2, timeout=60, what="the new generation")
    finally:
        os.close(reader)


@pytest.mark.slow
def test_a_master_whose_log_is_stalled_still_stops(start_server, tmp_path):
    """SIGTERM with the master's log stalled: the workers leave and the
    master exits, each giving its log writer a bounded moment (5 s) rather
    than waiting for it forever."""
    from test_operations import ConfigLine

    fifo, reader = stalled_log(tmp_path)
    try:
        server = start_server("--log-file", str(fifo), "--max-log-backlog", str(64 * 1024),
                              "--graceful-timeout", "2", workers=1)
        config = ConfigLine(server.config_port)
        for n in range(4000):  # the master's lines fill the pipe: every write to the log now blocks
            assert config.send(f"max_recipients={50 + n % 2}") == ["OK"]
        assert server.stop(timeout=60) == 0
    finally:
        os.close(reader)


@pytest.mark.slow
def test_a_reopen_onto_a_file_that_will_not_open_leaves_the_server_serving(start_server, tmp_path):
    """logrotate's USR1 when the log's name opens only once read (a FIFO
    nobody reads: open() blocks, as on a stalled disk or network file
    system). The master opened the new file on its main thread and hung
    there: no config port, no reaping. Now the open waits on a thread of
    its own, the old file takes the lines meanwhile, more signals are
    refused with a line, and the swap comes once the file opens."""
    from test_operations import ConfigLine

    server = start_server(workers=1)
    config = ConfigLine(server.config_port)  # 10 s per reply: a blocked master fails it
    assert config.send("max_recipients=70") == ["OK"]
    rotated = server.log_file.with_suffix(".1")
    server.log_file.rename(rotated)
    os.mkfifo(server.log_file)
    reader = -1
    try:
        server.proc.send_signal(signal.SIGUSR1)
        assert config.send("max_recipients=71") == ["OK"]
        assert send_mail(server) == 250
        wait_until(lambda: "config: max_recipients=71" in rotated.read_text(), what="the master's line in the old file")
        server.proc.send_signal(signal.SIGUSR1)  # refused by the master and the worker: one reopen at a time
        wait_until(lambda: rotated.read_text().count(" is still opening ") == 2, what="the two refusals")
        assert "Traceback" not in rotated.read_text()

        reader = os.open(server.log_file, os.O_RDONLY | os.O_NONBLOCK)
        received = bytearray()
        wait_until(lambda: received.extend(read_available(reader)) or b" : log file reopened\n" in received,
                   what="the master's first line in the new file")
        assert config.send("max_recipients=72") == ["OK"]
        client = server.client()
        client.cmd("EHLO after-the-reopen.example")
        client.close()
        wait_until(lambda: received.extend(read_available(reader)) or b"after-the-reopen.example" in received,
                   what="the worker's lines in the new file")
        assert b"config: max_recipients=72" in received
        assert b"after-the-reopen.example" not in rotated.read_bytes()
    finally:
        if reader >= 0:
            os.close(reader)
        server.stop()


def reopen_onto_a_folder(server) -> Path:
    """Rotate the log, leave a folder in its name's place, send USR1, and
    wait for the master's and the worker's lines saying the reopen failed;
    returns the file they still write to."""
    rotated = server.log_file.with_suffix(".1")
    server.log_file.rename(rotated)
    server.log_file.mkdir()
    server.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: rotated.read_text().count(" could not be reopened ") == 2, what="the master's and the worker's line")
    return rotated


@pytest.mark.slow
def test_a_reopen_that_cannot_open_the_file_is_one_line_and_changes_nothing(start_server, tmp_path):
    """USR1 with the log's name taken by a folder: the master and the worker
    each say so in one line in the file they keep writing (the master
    logged a traceback of its failed step)."""
    from test_operations import ConfigLine

    server = start_server(workers=1)
    rotated = reopen_onto_a_folder(server)
    text = rotated.read_text()
    assert re.search(r"\d\d : log file \S+ could not be reopened \(\[Errno 21\] Is a directory: .*\); "
                     r"still writing to the one open before\n", text), text[-2000:]
    assert re.search(r"\d\d : worker 1: log file \S+ could not be reopened ", text), text[-2000:]
    assert "Traceback" not in text and "unexpected error" not in text
    assert ConfigLine(server.config_port).send("max_recipients=73") == ["OK"]
    assert send_mail(server) == 250
    wait_until(lambda: "config: max_recipients=73" in rotated.read_text(), what="the master's next line")


@pytest.mark.slow
def test_workers_started_while_the_log_path_cannot_be_opened_write_to_the_masters_file(start_server, tmp_path):
    """After a reopen that could not open the file (its name taken by a
    folder), the master writes on to the file it had. A worker started then
    (a reload, a replacement) could not open the path either, and crashed
    at every start: a reload never answered, a dead worker was never
    replaced. Now it writes to the master's file too, and says so."""
    from test_operations import ConfigLine

    server = start_server(workers=1)
    rotated = reopen_onto_a_folder(server)
    (first,) = server.worker_pids()
    config = ConfigLine(server.config_port)
    config.sock.settimeout(60)
    assert config.send("reload=1") == ["OK"]  # the new generation started
    (second,) = set(server.accepting_workers()) - {first}
    assert send_mail(server) == 250
    wait_until(lambda: "writing to the one the master has open" in rotated.read_text(), what="the new worker's line")
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: set(server.accepting_workers()) - {first, second}, timeout=60, what="a replacement worker")
    client = server.client()
    client.cmd("EHLO after-the-replacement.example")
    client.close()
    wait_until(lambda: "after-the-replacement.example" in rotated.read_text(), what="the replacement's lines")
    text = rotated.read_text()
    opened_elsewhere = re.findall(r"\d\d : worker \d+: log file \S+ could not be opened \(\[Errno 21\] Is a directory: .*\); "
                                  r"writing to the one the master has open\n", text)
    assert len(opened_elsewhere) == 2, text[-3000:]  # the reload's worker, then its replacement
    assert "Traceback" not in text and "crashed" not in text and "died: exit code" not in text, text[-3000:]
    assert list(server.log_file.iterdir()) == []
