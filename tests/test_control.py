"""The config protocol on its own (sans-IO)."""

from __future__ import annotations

from prefork_smtpd.control import PARAMETERS, ConfigSession


def new(secret=None):
    applied = []
    values = {p: 1 for p in PARAMETERS}
    reloads = []
    session = ConfigSession(lambda n, v: applied.append((n, v)), lambda: values, secret, reloads.append)
    return session, applied, reloads


def test_messages_are_case_insensitive_and_accept_lf_or_crlf():
    s, applied, _ = new()
    assert s.feed(b"LOGGING=0\nMax_Recipients = 50\r\nlogger=7\r\n") == b"OK\r\nOK\r\nOK\r\n"
    assert applied == [("logging", 0), ("max_recipients", 50), ("logging", 7)]


def test_split_input_and_quit():
    s, applied, _ = new()
    assert s.feed(b"time") == b""
    assert s.feed(b"out=5\r") == b""
    assert s.feed(b"\nQUIT\r\nlogging=1\r\n") == b"OK\r\nOK\r\n"
    assert s.closing and applied == [("timeout", 5)]


def test_errors_apply_nothing():
    s, applied, _ = new()
    out = s.feed(b"logging=x\r\nworkers=0\r\nfoo=1\r\n=3\r\n" + b"y" * 300 + b"\r\n\xff=1\r\n")
    assert out.count(b"ERR ") == 6 and b"OK" not in out
    assert applied == []


def test_token_gate():
    s, applied, _ = new(secret=42)
    assert s.feed(b"logging=0\r\n").startswith(b"ERR authentication required")
    assert s.feed(b"token=41\r\n") == b"ERR bad token\r\n"
    assert s.feed(b"token=42\r\nlogging=0\r\n") == b"OK\r\nOK\r\n"
    assert applied == [("logging", 0)]


def test_reload_reply_waits_and_later_lines_stay_in_order():
    s, applied, reloads = new()
    assert s.feed(b"reload=1\r\nlogging=0\r\n") == b""
    assert reloads == [s] and applied == []  # nothing after the reload runs yet
    assert s.reload_done(None) == b"OK\r\nOK\r\n"
    assert applied == [("logging", 0)]
    assert s.feed(b"reload=1\r\n") == b""
    assert s.reload_done("bad file") == b"ERR reload failed: bad file\r\n"


def test_show_lists_every_parameter():
    s, _, _ = new()
    lines = s.feed(b"show=1\r\n").decode().split("\r\n")
    assert lines[-2:] == ["OK", ""] and [l.split("=")[0] for l in lines[:-2]] == list(PARAMETERS)
