"""The real server: the seed report's scenarios, counters, limits, the master."""

from __future__ import annotations

import email
import mailbox
import os
import re
import signal
import smtplib
import socket

import psutil
import pytest

from harness import Client, tmpfs, wait_until


def read_maildir(server, folder: str) -> list[email.message.Message]:
    box = mailbox.Maildir(str(server.mail_dir / folder), factory=None, create=False)
    return [box.get_message(key) for key in sorted(box.keys())]


# ------------------------------------------------------------ seed section 7
def test_seed_generic_mail(server):
    c = server.client()
    assert c.greeting[0] == 220
    assert c.cmd("EHLO user")[0] == 250
    assert c.cmd("MAIL FROM: user@smtpd.com")[0] == 250
    assert c.cmd("RCPT TO: recipient")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Contenido del correo\r\n\r\n.\r\n")
    code, text = c.reply()
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    assert c.cmd("QUIT")[0] == 221
    (path,) = server.stored("recipient")
    assert path.read_bytes().endswith(b"\nContenido del correo\n\n")
    (msg,) = read_maildir(server, "recipient")
    assert msg["Return-Path"] == "<user@smtpd.com>"
    assert msg["Delivered-To"] == "recipient"
    assert "by mx.test (prefork-smtpd) with ESMTP id" in msg["Received"]


def test_seed_error_replies(server):
    c = server.client()
    got = [c.cmd(line)[0] for line in (
        "RCPT TO: rcpt@smtpd.com", "MAIL FROM: user@smtp.com", "DATA", "EHLO", "MAIL FROM: user",
        "RCPT TO:", "INVALID COMMAND", "XSTAT",
    )]
    assert got == [503, 503, 503, 501, 503, 503, 500, 501]
    # the same after a greeting, where the parameters themselves are checked
    assert c.cmd("EHLO user")[0] == 250
    assert c.cmd("MAIL FROM: user@smtp.com") == (550, "5.7.1 Error: sender domain not served here")
    assert c.cmd("MAIL FROM: user") == (501, "5.1.7 Syntax: MAIL FROM:<user@domain>")


def test_seed_two_concurrent_mails(server):
    a, b = server.client(), server.client()
    for c, me, other in ((a, "user1", "user2"), (b, "user2", "user1")):
        c.cmd(f"EHLO {me}")
        assert c.cmd(f"MAIL FROM: {me}@smtpd.com")[0] == 250
        assert c.cmd(f"RCPT TO: {other}")[0] == 250
        assert c.cmd("DATA")[0] == 354
    b.send("Subject: para user1\r\nEste correo est\u00e1 destinado al usuario 1.\r\n.\r\n".encode())
    a.send(b"Subject: para user2\r\nEste correo esta destinado al usuario 2.\r\n.\r\n")
    assert a.reply()[0] == 250 and b.reply()[0] == 250
    assert read_maildir(server, "user2")[0]["Subject"] == "para user2"
    assert read_maildir(server, "user1")[0]["Subject"] == "para user1"


def test_seed_five_recipients_and_repeated_commands(server):
    c = server.client()
    assert c.cmd("EHLO user")[0] == 250
    assert c.cmd("EHLO user")[0] == 250
    assert c.cmd("MAIL FROM: user@smtpd.com")[0] == 250
    assert c.cmd("MAIL FROM: user@smtpd.com")[0] == 503
    for i in range(1, 6):
        assert c.cmd(f"RCPT TO: r{i}")[0] == 250
    assert c.cmd("RCPT TO: r1")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"contenido\r\n.\r\n")
    assert c.reply()[0] == 250
    for i in range(1, 6):
        assert len(server.stored(f"r{i}")) == 1  # one copy per recipient, deduplicated


def test_seed_xstat_walkthrough(server):
    c = server.client()
    assert c.xstat("TOTAL") == 1 and c.xstat("CURRENT") == 1
    assert c.xstat("MAILS") == 0 and c.xstat("BYTES") == 0
    c.cmd("EHLO user")
    c.cmd("MAIL FROM: user@smtpd.com")
    c.cmd("RCPT TO: recipient")
    assert c.xstat("MAILS") == 0
    c.cmd("DATA")
    c.send(b"Subject: test\r\ndata\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.xstat("MAILS") == 1
    assert c.xstat("BYTES") == len(b"Subject: test\r\ndata\r\n")
    for ending in ("reset", "quit"):
        other = server.client()
        assert c.xstat("TOTAL") >= 2 and c.xstat("CURRENT") == 2
        if ending == "reset":
            other.reset()  # ctrl-c on nc: the socket just goes away
        else:
            assert other.cmd("QUIT")[0] == 221
            assert other.closed_by_server()
            other.close()
        wait_until(lambda: c.xstat("CURRENT") == 1, what="current connections to drop")
    assert c.xstat("TOTAL") == 3


# ----------------------------------------------------------- real clients
def test_smtplib_one_many_and_large(server):
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.ehlo()
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("enhancedstatuscodes")
        assert int(s.esmtp_features["size"]) == 10 * 1024 * 1024
        s.sendmail("a@smtpd.com", ["one@smtpd.com"], "Subject: one\r\n\r\nbody one\r\n")
        s.sendmail("a@smtpd.com", [f"m{i}@smtpd.com" for i in range(20)], "Subject: many\r\n\r\nto twenty\r\n")
        for i in range(50):
            s.sendmail("a@smtpd.com", ["loop"], f"Subject: n{i}\r\n\r\n.leading dot {i}\r\n")
        big = ("x" * 76 + "\r\n") * (5 * 1024 * 1024 // 78)
        s.sendmail("a@smtpd.com", ["big"], "Subject: big\r\n\r\n" + big)
    assert read_maildir(server, "one")[0].get_payload() == "body one\n"
    assert all(len(server.stored(f"m{i}")) == 1 for i in range(20))
    loop = read_maildir(server, "loop")
    assert sorted(m.get_payload() for m in loop) == sorted(f".leading dot {i}\n" for i in range(50))
    (bigmsg,) = read_maildir(server, "big")
    assert bigmsg.get_payload() == big.replace("\r\n", "\n")


def run(cmd: list[str], input: bytes | None = None) -> str:
    import subprocess

    result = subprocess.run(cmd, input=input, capture_output=True, timeout=120)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout.decode(errors="replace")


def test_swaks_with_pipelining(server):
    out = run([
        "swaks", "--server", f"127.0.0.1:{server.port}", "--pipeline", "--from", "a@smtpd.com",
        "--to", "s1@smtpd.com,s2@smtpd.com", "--header", "Subject: from swaks", "--body", "hi from swaks",
    ])
    assert "<** " not in out  # swaks marks server errors this way
    for folder in ("s1", "s2"):
        (msg,) = read_maildir(server, folder)
        assert msg["Subject"] == "from swaks" and "hi from swaks" in msg.get_payload()


def test_curl(server, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"Subject: from curl\r\n\r\nhello curl\r\n.line with dot\r\n")
    run([
        "curl", "-sS", "--url", f"smtp://127.0.0.1:{server.port}/client.example", "--mail-from", "a@smtpd.com",
        "--mail-rcpt", "c1@smtpd.com", "--upload-file", str(eml),
    ])
    (msg,) = read_maildir(server, "c1")
    assert msg.get_payload() == "hello curl\n.line with dot\n"


def test_msmtp(server):
    run([
        "msmtp", "--host=127.0.0.1", f"--port={server.port}", "--from=a@smtpd.com", "--auth=off", "--tls=off",
        "ms@smtpd.com",
    ], input=b"Subject: from msmtp\n\nhello msmtp\n")
    (msg,) = read_maildir(server, "ms")
    assert msg["Subject"] == "from msmtp"


@pytest.mark.slow
def test_smtp_source_2000_mails(start_server):
    server = start_server(workers=2)
    run([
        "smtp-source", "-s", "20", "-m", "2000", "-d", "-f", "a@smtpd.com", "-t", "sink@smtpd.com",
        "-M", "client.example", f"127.0.0.1:{server.port}",
    ])
    assert len(server.stored("sink")) == 2000
    c = server.client()
    assert c.xstat("MAILS") == 2000


# ---------------------------------------------------------- hostile input
def test_hostile_input_gets_replies_and_writes_nothing_outside(server):
    c = server.client()
    c.cmd("EHLO x")
    assert c.cmd("NOOP " + "A" * 10_000)[0] == 500
    assert c.cmd(b"NO\x00OP")[0] == 500
    assert c.cmd(b"\xff\xfe\xfd")[0] == 500
    c.send(b"NOOP\n")
    assert c.reply()[0] == 500
    assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
    for rcpt in ("../x", "../../etc/passwd@smtpd.com", ".hidden", "a/b", "x\\y"):
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] in (501, 553), rcpt
    assert c.cmd("RCPT TO:<ok>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: ../../x/../../y\r\nSubject: a/b\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("NOOP")[0] == 250
    outside = [p for p in server.all_files() if server.root not in p.parents]
    assert not outside
    # Every file is in the mail's folder, or the store's own journal.
    stored = [p for p in server.mail_dir.rglob("*") if p.is_file() and p.parent.name != ".journal"]
    assert [p.relative_to(server.mail_dir).parts[:2] for p in stored] == [("ok", "new")]


def test_thousand_recipients(server):
    c = server.client()
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@smtpd.com>")
    c.send("".join(f"RCPT TO:<r{i}>\r\n" for i in range(1000)).encode())
    got = [c.reply()[0] for _ in range(1000)]
    assert got == [250] * 100 + [452] * 900
    assert c.cmd("DATA")[0] == 354
    c.send(b"x\r\n.\r\n")
    assert c.reply()[0] == 250
    assert len([p for p in server.mail_dir.iterdir() if p.name not in (".tmp", ".journal")]) == 100  # the store's


def test_body_over_size_limit_then_session_goes_on(server):
    c = server.client()
    c.cmd("EHLO x")
    assert c.cmd(f"MAIL FROM:<a@smtpd.com> SIZE={20 * 1024 * 1024}")[0] == 552
    c.cmd("MAIL FROM:<a@smtpd.com>")
    c.cmd("RCPT TO:<big>")
    assert c.cmd("DATA")[0] == 354
    chunk = b"y" * 998 + b"\r\n"
    for _ in range(20 * 1024 * 1024 // len(chunk)):
        c.send(chunk)
    c.send(b".\r\n")
    assert c.reply()[0] == 552
    assert c.xstat("MAILS") == 0
    assert c.mail("a@smtpd.com", ["small"], b"fits")[0] == 250
    assert not server.stored("big")


def test_bare_lf_cannot_smuggle_a_second_mail(server):
    c = server.client()
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@smtpd.com>")
    c.cmd("RCPT TO:<victim>")
    c.cmd("DATA")
    c.send(b"Subject: one\r\n\r\nhi\n.\nMAIL FROM:<ceo@smtpd.com>\r\nRCPT TO:<victim>\r\nDATA\r\nfake\r\n.\r\n")
    code, text = c.reply()
    assert code == 550 and "bare CR or LF" in text
    assert c.cmd("NOOP")[0] == 250  # nothing else was taken as a command
    assert not server.stored("victim")


# -------------------------------------------------------------- limits
def test_limit_flags(start_server):
    server = start_server(
        "--max-message-size", "2048", "--max-recipients", "2", "--max-command-line", "600",
        "--max-text-line", "1200", "--max-errors", "5",
    )
    c = server.client()
    assert "SIZE 2048" in c.cmd("EHLO x")[1]
    assert c.cmd("NOOP " + "a" * 590)[0] == 250
    assert c.cmd("NOOP " + "a" * 600)[0] == 500
    c.cmd("MAIL FROM:<a@smtpd.com>")
    assert [c.cmd(f"RCPT TO:<r{i}>")[0] for i in range(3)] == [250, 250, 452]
    c.cmd("DATA")
    c.send(b"z" * 1100 + b"\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.mail("a@smtpd.com", ["r"], b"z" * 1199 + b"\r\n")[0] == 500
    assert c.mail("a@smtpd.com", ["r"], (b"z" * 100 + b"\r\n") * 30)[0] == 552
    # errors so far: the long NOOP, the long DATA line, the oversized message
    assert c.cmd("BAD")[0] == 500  # the fourth
    c.send(b"BAD\r\n")  # the fifth reaches --max-errors 5
    assert c.reply()[0] == 500
    assert c.reply()[0] == 421
    assert c.closed_by_server()


def drip_until_closed(client, limit: float) -> tuple[float, bytes]:
    """Send one byte every 0.2 s (a slowloris) until the server hangs up."""
    import select
    import time

    start = time.monotonic()
    received = b""
    while time.monotonic() - start < limit:
        readable, _, _ = select.select([client.sock], [], [], 0.2)
        if readable:
            chunk = client.sock.recv(4096)
            received += chunk
            if not chunk:
                return time.monotonic() - start, received
            continue
        try:
            client.sock.send(b"N")
        except OSError:
            return time.monotonic() - start, received
    raise AssertionError("server never cut the slow client")


@pytest.mark.slow
def test_idle_timeout_and_slowloris(start_server):
    server = start_server("--timeout", "1")
    idle = server.client()
    slow = server.client()
    elapsed, received = drip_until_closed(slow, limit=10)
    assert received.startswith(b"421 4.4.2") and elapsed < 4
    idle.sock.settimeout(10)
    assert idle.reply()[0] == 421
    assert idle.closed_by_server()


@pytest.mark.slow
def test_data_timeout(start_server):
    server = start_server("--timeout", "30", "--data-timeout", "1")
    c = server.client()
    c.cmd("EHLO x"); c.cmd("MAIL FROM:<a@smtpd.com>"); c.cmd("RCPT TO:<r>")
    assert c.cmd("DATA")[0] == 354
    elapsed, received = drip_until_closed(c, limit=10)
    assert received.startswith(b"421 4.4.2") and elapsed < 4
    assert not server.stored("r")


def test_bad_flag_values_exit_2_with_one_line(tmp_path):
    import subprocess
    import sys

    for args in (["--workers", "zero"], ["--max-recipients", "0"], ["-P", "70000"], ["--nope"]):
        r = subprocess.run([sys.executable, "-m", "prefork_smtpd", *args], capture_output=True, cwd=tmp_path)
        assert r.returncode == 2, args
        assert r.stderr.decode().count("\n") == 1 and "error:" in r.stderr.decode(), r.stderr
    r = subprocess.run([sys.executable, "-m", "prefork_smtpd", "-v"], capture_output=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode().startswith("prefork-smtpd ")


# ---------------------------------------------------------- delivery faults
def test_unwritable_folder_gives_451_and_server_goes_on(server):
    server.mail_dir.mkdir(exist_ok=True)
    (server.mail_dir / "blocked").write_text("a file where a folder should be")
    c = server.client()
    c.cmd("EHLO x")
    assert c.mail("a@smtpd.com", ["ok1", "blocked"], b"hello")[0] == 451
    assert not server.stored("ok1")  # all or nothing: no copy for the other recipient
    assert not list((server.mail_dir / "ok1" / "tmp").iterdir())
    assert c.mail("a@smtpd.com", ["ok1"], b"hello")[0] == 250
    assert c.xstat("MAILS") == 1


@pytest.mark.root("mounts a tmpfs")
def test_disk_full_gives_452_and_recovers(start_server, tmp_path):
    with tmpfs(tmp_path / "small", "256k") as full:
        server = start_server("--mail-dir", str(full), "--min-free-space", "0")  # the store's own ENOSPC path
        c = server.client()
        c.cmd("EHLO x")
        assert c.mail("a@smtpd.com", ["u"], b"small one")[0] == 250
        body = (b"x" * 998 + b"\r\n") * 400  # 400 KB: cannot fit
        assert c.mail("a@smtpd.com", ["u"], body)[0] == 452
        assert len(list((full / "u" / "new").iterdir())) == 1
        assert not list((full / "u" / "tmp").iterdir())
        assert c.mail("a@smtpd.com", ["u"], b"fits again")[0] == 250


def test_mail_dir_removed_under_running_server(server):
    import shutil

    c = server.client()
    c.cmd("EHLO x")
    assert c.mail("a@smtpd.com", ["u"], b"one")[0] == 250
    shutil.rmtree(server.mail_dir)
    code = c.mail("a@smtpd.com", ["u"], b"two")[0]
    assert code in (250, 451)
    assert c.mail("a@smtpd.com", ["u"], b"three")[0] == 250
    assert len(server.stored("u")) == (2 if code == 250 else 1)


# ------------------------------------------------------- counters, workers
def test_counters_are_server_wide_and_survive_rst_middata_and_sigkill(start_server):
    server = start_server(workers=4)
    clients = [server.client() for _ in range(40)]
    pids = {}
    workers = server.worker_pids()
    assert len(workers) == 4
    # Which worker holds which client: match our local port in the workers' sockets.
    for pid in workers:
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.raddr:
                pids[conn.raddr.port] = pid
    owners = {c: pids[c.sock.getsockname()[1]] for c in clients}
    assert len(set(owners.values())) >= 2, "connections all went to one worker"

    sent_bytes = 0
    for i, c in enumerate(clients[:10]):
        c.cmd("EHLO x")
        body = b"mail %d\r\n" % i
        assert c.mail("a@smtpd.com", ["r"], body)[0] == 250
        sent_bytes += len(body) + 2
    probe = clients[-1]
    assert {c.xstat("MAILS") for c in clients[:: 5]} == {10}
    assert {c.xstat("BYTES") for c in clients[:: 5]} == {sent_bytes}
    assert {c.xstat("CURRENT") for c in clients[:: 5]} == {40}

    # mid-DATA vanish, RST vanish, QUIT
    c = clients[10]
    c.cmd("EHLO x"); c.cmd("MAIL FROM:<a@smtpd.com>"); c.cmd("RCPT TO:<r>"); c.cmd("DATA")
    c.send(b"partial line\r\nmore")
    c.reset()
    clients[11].reset()
    clients[12].cmd("QUIT")
    alive = [c for c in clients if c not in clients[10:13]]
    wait_until(lambda: probe.xstat("CURRENT") == len(alive), what="CURRENT after vanishing clients")

    # kill one worker that does not hold the probe
    victim = next(pid for pid in set(owners.values()) if pid != owners[probe])
    os.kill(victim, signal.SIGKILL)
    survivors = [c for c in alive if owners[c] != victim]
    wait_until(lambda: probe.xstat("CURRENT") == len(survivors), what="CURRENT after SIGKILL")
    assert probe.xstat("MAILS") == 10 and probe.xstat("BYTES") == sent_bytes
    assert probe.xstat("TOTAL") == 40
    server.wait_ready(workers=4)  # replaced
    wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 4, what="respawn")
    assert "died: killed by SIGKILL" in server.log_text()
    assert probe.xstat("TOTAL") == 40


# ------------------------------------------------------------- the master
def test_process_titles_and_ipv6(start_server):
    server = start_server(workers=2, listen=None)
    master = psutil.Process(server.proc.pid)
    assert master.cmdline()[0].startswith("prefork-smtpd: master")
    titles = sorted(psutil.Process(pid).cmdline()[0] for pid in server.worker_pids())
    assert re.match(r"prefork-smtpd: worker 1 \[\d+ connections\]", titles[0])
    assert titles[1].startswith("prefork-smtpd: worker 2")
    if socket.has_ipv6:
        c = Client(server.port, host="::1")
        assert c.cmd("EHLO v6")[0] == 250
    c4 = Client(server.port, host="127.0.0.1")
    assert c4.cmd("EHLO v4")[0] == 250


def test_sigterm_lets_a_transaction_finish_then_exits_0(server):
    c = server.client()
    idle = server.client()
    c.cmd("EHLO x"); c.cmd("MAIL FROM:<a@smtpd.com>"); c.cmd("RCPT TO:<late>"); c.cmd("DATA")
    c.send(b"Subject: in flight\r\n")
    server.proc.send_signal(signal.SIGTERM)
    assert idle.reply()[0] == 421  # idle sessions are told at once
    c.send(b"finished\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 421  # then the session is closed
    assert server.proc.wait(timeout=30) == 0
    assert len(server.stored("late")) == 1
    log = server.log_text()
    assert "Server Initialized" in log and log.rstrip().endswith("Server Shutting Down")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d : Server Initialized", log)


def test_logging_flag_off_logs_no_session_events(start_server):
    server = start_server("--logging", "0")
    c = server.client()
    c.cmd("EHLO quiet")
    assert c.mail("a@smtpd.com", ["q"], b"x")[0] == 250
    c.cmd("QUIT")
    assert server.stop() == 0
    assert "quiet" not in server.log_text() and "connected" not in server.log_text()


@pytest.mark.slow
def test_crashing_workers_are_replaced_with_backoff(start_server):
    server = start_server(workers=1)
    for _ in range(3):
        (pid,) = wait_until(server.accepting_workers, what="a worker")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid not in server.worker_pids(), what="the worker to die")
    server.wait_ready(workers=1)
    log = server.log_text()
    delays = [float(x) for x in re.findall(r"next fork in ([0-9.]+)s", log)]
    assert len(delays) == 3 and delays == sorted(delays) and delays[-1] > delays[0]
    assert server.client().cmd("NOOP")[0] == 250


def test_log_lines_are_whole_under_concurrency(start_server):
    server = start_server(workers=4)
    import threading

    def send(n):
        with smtplib.SMTP("127.0.0.1", server.port) as s:
            for i in range(10):
                s.sendmail("a@smtpd.com", [f"l{n}"], f"Subject: {i}\r\n\r\nx\r\n")

    threads = [threading.Thread(target=send, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.stop() == 0
    lines = server.log_text().splitlines()
    assert len([line for line in lines if " mail " in line]) == 160
    pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d : \S")
    assert all(pattern.match(line) for line in lines), [l for l in lines if not pattern.match(l)][:3]


def test_8bitmime_body_is_stored_byte_for_byte(server):
    body = "Subject: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nni\u00f1o \u2713\r\n".encode()
    latin1 = b"Subject: x\r\n\r\n\xe9t\xe9 \xff\r\n"
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("a@smtpd.com", ["eight"], body, mail_options=["BODY=8BITMIME"])
        s.sendmail("a@smtpd.com", ["eight"], latin1, mail_options=["BODY=8BITMIME"])
    stored = sorted(p.read_bytes().split(b"\n\n", 1)[1] for p in server.stored("eight"))
    # the trace headers end at the first blank line of ours; the rest is the message, LF-ended
    expected = sorted(m.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] for m in (body, latin1))
    assert stored == expected


def test_python_m_runs_from_the_source_folder():
    """``python -m prefork_smtpd`` from a checkout's root imports the source
    folder first (the current directory leads sys.path): its front ends must
    be inside the package there too, not only in an installed wheel."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "prefork_smtpd", "--version"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.startswith("prefork-smtpd "), run.stderr
