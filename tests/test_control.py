"""The config protocol on its own (sans-IO)."""

from __future__ import annotations

from prefork_smtpd.control import ConfigSession, TokenGate, address_key, parse_show_line
from prefork_smtpd.controlplane import ControlPlane
from prefork_smtpd.settings import PARAMETERS, Settings


class Block(dict):
    """A control block without shared memory: records what is written."""

    def __init__(self):
        super().__init__()
        self.written = []

    def set(self, name, value):
        self[name] = value
        self.written.append((name, value))


def new(secret=None):
    block = Block()
    plane = ControlPlane(Settings(workers=1, hostname="h"))
    plane.attach(block)
    block.written.clear()
    reloads = []
    gate = TokenGate(secret, 10) if secret is not None else None
    session = ConfigSession(plane.apply, plane.live_values, gate, reloads.append, "192.0.2.1:5")
    return session, block.written, reloads


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


def test_an_action_with_any_value_but_1_is_refused_and_does_nothing():
    s, applied, reloads = new()
    flushes = []
    s.flush = lambda: flushes.append(1)
    for line in (b"reload=0", b"reload=2", b"RELOAD=-1", b"flush=0", b"show=0", b"show=-1"):
        name = line.split(b"=")[0].lower()
        assert s.feed(line + b"\r\n") == b"ERR %s: an action, send %s=1\r\n" % (name, name), line
    assert reloads == [] and flushes == [] and applied == []
    assert s.feed(b"flush=1\r\n") == b"OK\r\n" and flushes == [1]


def test_show_lists_every_parameter():
    s, _, _ = new()
    lines = s.feed(b"show=1\r\n").decode().split("\r\n")
    assert lines[-2:] == ["OK", ""] and [l.split("=")[0] for l in lines[:-2]] == list(PARAMETERS)


def test_show_tells_each_source():
    s, _, _ = new()
    line = s.feed(b"show=1\r\n").decode().split("\r\n")[0]
    assert line == "logging=1 (default)"
    assert parse_show_line("max_recipients=7 (live)") == ("max_recipients", 7, "live")


def test_out_of_range_integers_are_answered_with_the_range():
    s, applied, _ = new()
    assert s.feed(b"max_recipients=99999999999999999999\r\n") == b"ERR max_recipients must be between 1 and 100000\r\n"
    assert s.feed(b"workers=-1" + b"0" * 200 + b"\r\n") == b"ERR workers must be between 1 and 128\r\n"
    assert applied == []


def test_secret_zero_still_needs_its_token():
    s, applied, _ = new(secret=0)
    assert not s.authenticated
    assert s.feed(b"logging=0\r\n").startswith(b"ERR authentication required")
    assert s.feed(b"token=0\r\nlogging=0\r\n") == b"OK\r\nOK\r\n"
    assert applied == [("logging", 0)]


def test_every_refusal_before_login_counts_and_the_last_closes():
    s, _, _ = new(secret=42)
    assert s.feed(b"\r\n").startswith(b"ERR expected")
    assert s.feed(b"x" * 400 + b"\r\n") == b"ERR line too long\r\n"
    assert s.feed(b"token=1\r\ntoken=42\r\n") == b"ERR bad token; too many failed logins, closing\r\n"
    assert s.closing and not s.authenticated


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_address_budget_refills_at_its_rate_and_the_table_is_bounded():
    clock = Clock()
    gate = TokenGate(7, failures_per_minute=2, clock=clock, max_addresses=3)
    gate.spend("a"); gate.spend("a")
    assert not gate.may_try("a") and gate.may_try("b")
    assert gate.first_refusal("a") and not gate.first_refusal("a")  # logged once
    clock.now += 30  # a minute refills 2: half a minute, 1
    assert gate.may_try("a")
    for key in "bcde":
        gate.spend(key)
    assert len(gate._budgets) == 3 and "a" not in gate._budgets


def test_ipv6_clients_share_a_budget_per_64():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("192.0.2.7") == "192.0.2.7"
    s = ConfigSession(lambda n, v: None, lambda: {}, TokenGate(1, 10), None, "[2001:db8::5]:4000")
    assert s.address == "2001:db8::/64"
