"""SMTP AUTH PLAIN and LOGIN as a state machine: every path, and random input."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_smtpd.sasl import (
    AUTHZID_REFUSED,
    BAD_BASE64,
    CANCELLED,
    LINE_TOO_LONG,
    MALFORMED,
    MAX_AUTH_LINE,
    SYNTAX,
    UNKNOWN_MECHANISM,
    Challenge,
    CheckCredentials,
    Failure,
    SaslExchange,
    ehlo_keyword,
    encode_plain,
)


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


# ------------------------------------------------------------------ PLAIN
def test_plain_with_initial_response():
    step = SaslExchange().start(b"PLAIN " + b64("\0bob\0s3cret"))
    assert step == CheckCredentials("PLAIN", "bob", "s3cret")


def test_plain_mechanism_name_is_case_insensitive():
    step = SaslExchange().start(b"plain " + b64("\0bob\0s3cret"))
    assert step == CheckCredentials("PLAIN", "bob", "s3cret")


def test_plain_with_continuation():
    ex = SaslExchange()
    assert ex.start(b"PLAIN") == Challenge(b"334 \r\n")
    assert not ex.done
    assert ex.feed(b64("\0bob\0s3cret")) == CheckCredentials("PLAIN", "bob", "s3cret")
    assert ex.done


def test_plain_authzid_equal_to_authcid_is_accepted():
    step = SaslExchange().start(b"PLAIN " + b64("bob@smtpd.com\0bob@smtpd.com\0pw"))
    assert step == CheckCredentials("PLAIN", "bob@smtpd.com", "pw")


def test_plain_authzid_differing_only_in_case_is_that_user():
    step = SaslExchange().start(b"PLAIN " + b64("ALICE\0alice\0pw"))
    assert step == CheckCredentials("PLAIN", "alice", "pw")
    # Unicode case folding would make these equal: they are not the same name.
    step = SaslExchange().start(b"PLAIN " + b64("\u212aate\0kate\0pw"))
    assert step == Failure(AUTHZID_REFUSED)


def test_plain_other_authzid_is_refused():
    step = SaslExchange().start(b"PLAIN " + b64("alice\0bob\0pw"))
    assert step == Failure(AUTHZID_REFUSED)
    assert step.reply.startswith(b"535 5.7.8 ")


@pytest.mark.parametrize(
    "message",
    [
        "bob\0pw",  # one NUL
        "\0bob\0pw\0",  # three NULs
        "\0\0pw",  # empty user
        "\0bob\0",  # empty password
        "\0bo\nb\0pw",  # a control character would forge a log line
        "\0bob\x7f\0pw",
    ],
)
def test_plain_malformed_message(message):
    assert SaslExchange().start(b"PLAIN " + b64(message)) == Failure(MALFORMED)


def test_plain_non_utf8_is_malformed():
    assert SaslExchange().start(b"PLAIN " + b64(b"\0b\xffob\0pw")) == Failure(MALFORMED)
    assert SaslExchange().start(b"PLAIN " + b64(b"\0bob\0p\xc3")) == Failure(MALFORMED)
    assert SaslExchange().start(b"PLAIN " + b64(b"\xfe\0bob\0pw")) == Failure(MALFORMED)


def test_plain_utf8_credentials():
    step = SaslExchange().start(b"PLAIN " + b64("\0jörg\0pässwörd ✓"))
    assert step == CheckCredentials("PLAIN", "jörg", "pässwörd ✓")


def test_trailing_space_is_no_initial_response():
    assert SaslExchange().start(b"PLAIN ") == Challenge(b"334 \r\n")
    assert SaslExchange().start(b"LOGIN  ") == Challenge(b"334 VXNlcm5hbWU6\r\n")


def test_plain_empty_initial_response_is_malformed():
    # "=" is an initial response of zero length (RFC 4954), not a request
    # for a challenge; an empty PLAIN message has no user name.
    assert SaslExchange().start(b"PLAIN =") == Failure(MALFORMED)


def test_plain_empty_continuation_is_malformed():
    ex = SaslExchange()
    ex.start(b"PLAIN")
    assert ex.feed(b"") == Failure(MALFORMED)


# ------------------------------------------------------------------ LOGIN
def test_login_prompts_for_user_then_password():
    ex = SaslExchange()
    assert ex.start(b"LOGIN") == Challenge(b"334 VXNlcm5hbWU6\r\n")
    assert base64.b64decode(b"VXNlcm5hbWU6") == b"Username:"
    assert ex.feed(b64("bob")) == Challenge(b"334 UGFzc3dvcmQ6\r\n")
    assert base64.b64decode(b"UGFzc3dvcmQ6") == b"Password:"
    assert ex.feed(b64("s3cret")) == CheckCredentials("LOGIN", "bob", "s3cret")
    assert ex.done


def test_login_initial_response_is_the_user_name():
    ex = SaslExchange()
    assert ex.start(b"LOGIN " + b64("bob")) == Challenge(b"334 UGFzc3dvcmQ6\r\n")
    assert ex.feed(b64("s3cret")) == CheckCredentials("LOGIN", "bob", "s3cret")


@pytest.mark.parametrize("username", [b"", b"bo\rb", b"\xff\xfe", b"bob\0"])
def test_login_bad_user_name(username):
    ex = SaslExchange()
    ex.start(b"LOGIN")
    assert ex.feed(b64(username)) == Failure(MALFORMED)
    assert ex.done


@pytest.mark.parametrize("password", [b"", b"pw\0", b"\xc3"])
def test_login_bad_password(password):
    ex = SaslExchange()
    ex.start(b"LOGIN")
    ex.feed(b64("bob"))
    assert ex.feed(b64(password)) == Failure(MALFORMED)


def test_login_password_may_hold_spaces_and_symbols():
    ex = SaslExchange()
    ex.start(b"LOGIN")
    ex.feed(b64("bob"))
    assert ex.feed(b64(" p:w \t*")) == CheckCredentials("LOGIN", "bob", " p:w \t*")


# ------------------------------------------------------ cancel, errors, limits
@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_star_cancels_at_any_step(mechanism):
    ex = SaslExchange()
    ex.start(mechanism)
    assert ex.feed(b"*") == Failure(CANCELLED)
    assert CANCELLED == b"501 5.7.0 Authentication cancelled\r\n"
    assert ex.done


def test_star_cancels_at_login_password_step():
    ex = SaslExchange()
    ex.start(b"LOGIN")
    ex.feed(b64("bob"))
    assert ex.feed(b"*") == Failure(CANCELLED)


def test_star_as_initial_response_cancels():
    assert SaslExchange().start(b"PLAIN *") == Failure(CANCELLED)


@pytest.mark.parametrize(
    "bad",
    [b"not base64!", b"AAA", b"AA==AA==", b"QU JD", b" QUJD", b"QUJD\t", b"====", b"A"],
)
def test_bad_base64(bad):
    ex = SaslExchange()
    ex.start(b"PLAIN")
    step = ex.feed(bad)
    assert step == Failure(BAD_BASE64)
    assert step.reply.startswith(b"501 5.5.2 ")


def test_bad_base64_in_initial_response():
    assert SaslExchange().start(b"PLAIN %%%") == Failure(BAD_BASE64)
    assert SaslExchange().start(b"LOGIN %%%") == Failure(BAD_BASE64)


@pytest.mark.parametrize("argument", [b"CRAM-MD5", b"XOAUTH2 abc", b"GSSAPI", b"SCRAM-SHA-256"])
def test_unknown_mechanism(argument):
    step = SaslExchange().start(argument)
    assert step == Failure(UNKNOWN_MECHANISM)
    assert step.reply.startswith(b"504 5.5.4 ")


def test_mechanism_not_offered_is_unknown():
    # A server may offer only PLAIN (say, before TLS it offers nothing else).
    assert SaslExchange(mechanisms=("PLAIN",)).start(b"LOGIN") == Failure(UNKNOWN_MECHANISM)
    assert SaslExchange(mechanisms=("PLAIN",)).start(b"PLAIN") == Challenge(b"334 \r\n")


@pytest.mark.parametrize("argument", [b"", b"PLAIN a b", b"PL@IN", b" PLAIN", b"PLAIN  x", b"\xffPLAIN"])
def test_syntax_errors(argument):
    assert SaslExchange().start(argument) == Failure(SYNTAX)


def test_line_length_bound_on_initial_response():
    # The whole command line "AUTH PLAIN <resp>\r\n" may be 12288 octets.
    fits = b"PLAIN " + b"A" * (MAX_AUTH_LINE - len(b"AUTH PLAIN \r\n"))
    over = fits + b"A"
    assert SaslExchange().start(fits) != Failure(LINE_TOO_LONG)
    assert SaslExchange().start(over) == Failure(LINE_TOO_LONG)


def test_line_length_bound_on_continuation():
    longest = MAX_AUTH_LINE - 2  # octets before the CRLF
    # The longest base64 text that fits is a multiple of 4: accepted whole.
    user = "u"
    password = "p" * ((longest // 4) * 3 - 2 - len(user))
    line = encode_plain(user, password)
    assert len(line) == longest - longest % 4
    ex = SaslExchange()
    ex.start(b"PLAIN")
    assert ex.feed(line) == CheckCredentials("PLAIN", user, password)
    # At the limit the line is judged on its content, past it refused unread.
    ex = SaslExchange()
    ex.start(b"PLAIN")
    assert ex.feed(b"A" * longest) == Failure(BAD_BASE64)
    ex = SaslExchange()
    ex.start(b"PLAIN")
    assert ex.feed(b"A" * (longest + 1)) == Failure(LINE_TOO_LONG)
    assert LINE_TOO_LONG.startswith(b"500 5.5.6 ")


def test_misuse_raises():
    ex = SaslExchange()
    with pytest.raises(RuntimeError):
        ex.feed(b"x")
    ex.start(b"PLAIN " + encode_plain("bob", "pw"))
    with pytest.raises(RuntimeError):
        ex.feed(b"x")
    with pytest.raises(RuntimeError):
        ex.start(b"PLAIN")


def test_password_never_in_repr():
    step = CheckCredentials("PLAIN", "bob", "hunter2")
    assert "hunter2" not in repr(step)
    assert "bob" in repr(step)


def test_ehlo_keyword():
    assert ehlo_keyword() == "AUTH PLAIN LOGIN"
    assert ehlo_keyword(("PLAIN",)) == "AUTH PLAIN"


# ------------------------------------------------------------- properties
_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0" + "".join(map(chr, range(32))) + "\x7f"),
    min_size=1,
    max_size=80,
)
_passwords = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=200)


@given(_names, _passwords, st.booleans(), st.booleans())
def test_plain_round_trip(username, password, with_authzid, initial):
    encoded = encode_plain(username, password, username if with_authzid else "")
    ex = SaslExchange()
    if initial:
        step = ex.start(b"PLAIN " + encoded)
    else:
        assert ex.start(b"PLAIN") == Challenge(b"334 \r\n")
        step = ex.feed(encoded)
    assert step == CheckCredentials("PLAIN", username, password)
    assert step.password == password


@given(_names, _passwords, st.booleans())
def test_login_round_trip(username, password, initial):
    ex = SaslExchange()
    if initial:
        step = ex.start(b"LOGIN " + b64(username))
    else:
        ex.start(b"LOGIN")
        step = ex.feed(b64(username))
    assert step == Challenge(b"334 UGFzc3dvcmQ6\r\n")
    assert ex.feed(b64(password)) == CheckCredentials("LOGIN", username, password)


def _check_step(step, ex):
    assert isinstance(step, (Challenge, CheckCredentials, Failure))
    if isinstance(step, Challenge):
        assert step.reply.startswith(b"334 ") and step.reply.endswith(b"\r\n")
        assert not ex.done
    else:
        assert ex.done
    if isinstance(step, Failure):
        assert step.reply[:1] in (b"5",) and step.reply.endswith(b"\r\n")
        assert step.reply.count(b"\r\n") == 1
    if isinstance(step, CheckCredentials):
        assert step.username and step.password
        assert "\0" not in step.username + step.password
        assert not any(ord(c) < 32 or c == "\x7f" for c in step.username)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.binary(max_size=200), max_size=4))
def test_random_bytes_never_raise(argument, lines):
    ex = SaslExchange()
    step = ex.start(argument)
    _check_step(step, ex)
    for line in lines:
        if ex.done:
            break
        step = ex.feed(line)
        _check_step(step, ex)


@settings(max_examples=300)
@given(
    st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"Login"]),
    st.lists(st.binary(max_size=120).map(base64.b64encode), max_size=3),
)
def test_random_valid_base64_never_raises(mechanism, lines):
    # Random bytes above rarely pass base64; this feeds decodable garbage.
    ex = SaslExchange()
    step = ex.start(mechanism)
    _check_step(step, ex)
    for line in lines:
        if ex.done:
            break
        _check_step(ex.feed(line), ex)
