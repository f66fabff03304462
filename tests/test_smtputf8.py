"""SMTPUTF8 (RFC 6531, 6532) in the sans-IO session, and the folder mapping.

Property tests: any local part maps to a safe folder name or is refused;
two local parts share a folder only when they are the same mailbox under
the documented equivalence (canonical caseless match, Unicode D145); an
ASCII local part keeps its folder (lowercase) as before.
"""

from __future__ import annotations

import os
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sansio import Wired

from prefork_smtpd import replies, smtputf8
from prefork_smtpd.session import Envelope, Limits, Session, folder_for

REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


def new_session() -> Wired:
    s = Wired(Session("mx.test", frozenset({"smtpd.com", "xn--r8jz45g.jp"}), Limits(), lambda key: 0))
    s.feed(b"EHLO c\r\n")
    return s


def is_safe_folder(name: str) -> bool:
    """What a folder name under mail_dir must be, checked independently."""
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and not name.startswith(".")
        and ".." not in name
        and os.path.basename(name) == name
        and len(name.encode("utf-8")) <= 255
        and all(c in "\u200c\u200d" or unicodedata.category(c) not in REFUSED_CATEGORIES for c in name)
        and unicodedata.is_normalized("NFC", name)
    )


# ------------------------------------------------------------ the mapping
@pytest.mark.parametrize("local, folder", [
    ("J\u00f6rg", "j\u00f6rg"),
    ("Jo\u0308rg", "j\u00f6rg"),  # decomposed: the same mailbox as the composed form
    ("STRASSE", "strasse"),
    ("Stra\u00dfe", "strasse"),  # case folding: ß is ss
    ("\u7528\u6237", "\u7528\u6237"),
    ("\u0391\u03b8\u03b7\u03bd\u03ac", "\u03b1\u03b8\u03b7\u03bd\u03ac"),
    ("\u212aelvin", "kelvin"),  # KELVIN SIGN folds to k
    ("r\u00e9sum\u00e9.bob", "r\u00e9sum\u00e9.bob"),
    ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"),  # ZWNJ (Persian)
])
def test_utf8_local_parts_map_to_their_canonical_caseless_form(local, folder):
    assert folder_for(local) == folder


# Each unsafe local part next to its safe sibling: the refusal is for the
# one unsafe character (a slash, NUL, C1 control, RLO override, spaces,
# line separator, dots, private use, unassigned, BOM), not for the UTF-8.
@pytest.mark.parametrize("local, sibling", [
    ("\u00e9/x", "\u00e9x"), ("\u00e9\x00", "\u00e90"), ("\u00e9\x85", "\u00e9\xe5"), ("\u00e9\u202ex", "\u00e9x"),
    ("\u00e9 x", "\u00e9_x"), ("\u00e9\u3000x", "\u00e9-x"), ("\u00e9\u2028", "\u00e9"), (".\u00e9", "_\u00e9"),
    ("\u00e9.", "\u00e9"), ("\u00e9..x", "\u00e9.x"), ("\u00e9\ue000", "\u00e9\u4e00"), ("\u00e9\u0378", "\u00e9\u0370"),
    ("\u00e9" * 33, "\u00e9" * 32), ("\u00e9\ufeff", "\u00e9\u200d"),
])
def test_unsafe_or_too_long_utf8_local_parts_are_refused(local, sibling):
    assert folder_for(local) is None
    assert folder_for(sibling) is not None


def test_length_is_counted_in_octets_composed():
    assert folder_for("\u00e9" * 32) == "\u00e9" * 32  # 64 octets
    assert folder_for("e\u0301" * 32) == "\u00e9" * 32  # 96 octets decomposed, 64 composed: the same mailbox
    assert folder_for("\u00e9" * 32 + "x") is None  # 65 octets, 33 characters


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=40))
@example("\u0130")  # LATIN CAPITAL I WITH DOT ABOVE: folds to i + combining dot
@example("\u1e9e\u00df")
@example("\ufb00")  # ff ligature
@example("\u0345")  # a combining mark whose folding is not stable
def test_any_input_maps_to_a_safe_name_or_is_refused(local):
    folder = folder_for(local)
    if folder is not None:
        assert is_safe_folder(folder), (local, folder)
        assert folder_for(folder) == folder  # stable: a folder's own name maps to itself


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.characters(categories=["Lu", "Ll", "Lo", "Nd"]), min_size=1, max_size=16))
def test_words_of_any_script_are_mailboxes_however_composed(local):
    """Letters and digits of any script, within 64 octets composed, are accepted;
    the decomposed spelling is the same mailbox."""
    if len(unicodedata.normalize("NFC", local).encode()) > 64:
        return
    folder = folder_for(local)
    assert folder is not None, local
    assert folder_for(unicodedata.normalize("NFD", local)) == folder


def d145(s: str) -> str:
    """Canonical caseless match's key (Unicode D145), computed here on its own."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", s).casefold())


# A small alphabet of look-alikes and case/composition traps, so that random
# pairs often meet: accents composed and not, sharp s, the Kelvin sign, a ligature.
TRAPS = "aeE\u00e9\u00c9\u00e8s\u00dfSkK\u212a\u0301\u0300f\ufb00.\u0130i\u0131"


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=TRAPS, min_size=1, max_size=6), st.text(alphabet=TRAPS, min_size=1, max_size=6))
def test_two_different_mailboxes_never_collide(a, b):
    fa, fb = folder_for(a), folder_for(b)
    if fa is not None and fa == fb:
        assert d145(a) == d145(b), (a, b, fa)  # the same folder only for the same mailbox
    if fa is not None and fb is not None and d145(a) == d145(b):
        assert fa == fb, (a, b)  # and the same mailbox always gets the same folder


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=6), st.data())
def test_variants_of_a_mailbox_share_its_folder_and_only_they(a, data):
    b = data.draw(st.sampled_from([
        a.upper(), a.lower(), unicodedata.normalize("NFD", a), unicodedata.normalize("NFKC", a), a + "x",
        "".join(c for c in unicodedata.normalize("NFD", a) if not unicodedata.combining(c)),
    ]))
    fa, fb = folder_for(a), folder_for(b)
    if fa is not None and fa == fb:
        assert d145(a) == d145(b), (a, b, fa)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=70))
def test_ascii_local_parts_keep_their_folder(local):
    folder = folder_for(local)
    assert folder is None or folder == local.lower()
    if folder is not None:
        # the UTF-8 mapping agrees with the ASCII one where both apply
        assert smtputf8.canonical_caseless(local) == folder


# --------------------------------------------------------------- sessions
def test_smtputf8_is_advertised():
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0))
    assert b"250-SMTPUTF8\r\n" in s.feed(b"EHLO c\r\n")


def test_a_utf8_address_needs_the_smtputf8_parameter():
    s = new_session()
    assert s.feed("MAIL FROM:<j\u00f6rg@smtpd.com>\r\n".encode()) == replies.UTF8_NEEDS_SMTPUTF8
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\n") == replies.SENDER_OK
    assert s.feed("RCPT TO:<j\u00f6rg@smtpd.com>\r\n".encode()) == replies.UTF8_NEEDS_SMTPUTF8
    assert s.feed("RCPT TO:<bob@\u4f8b\u3048.jp>\r\n".encode()) == replies.UTF8_NEEDS_SMTPUTF8
    assert s.feed(b"RCPT TO:<bob@smtpd.com>\r\n") == replies.RECIPIENT_OK
    assert b"553 5.6.7" in s.log[-1].encode() or any("553 5.6.7" in line for line in s.log)


def test_an_smtputf8_transaction_takes_utf8_addresses_and_domains():
    s = new_session()
    assert s.feed("MAIL FROM:<J\u00f6rg@smtpd.com> SMTPUTF8 BODY=8BITMIME\r\n".encode()) == replies.SENDER_OK
    assert s.feed("RCPT TO:<Jo\u0308RG@smtpd.com>\r\n".encode()) == replies.RECIPIENT_OK
    assert s.feed("RCPT TO:<\u7528\u6237@\u4f8b\u3048.jp>\r\n".encode()) == replies.RECIPIENT_OK
    assert s.feed("RCPT TO:<x@\u4f8b\u3048.example>\r\n".encode()) == replies.RELAY_DENIED
    assert s.feed("RCPT TO:<a/\u00e9@smtpd.com>\r\n".encode()) == replies.MAILBOX_NAME_NOT_ALLOWED
    assert s.feed(b"RCPT TO:<\xe9@smtpd.com>\r\n") == replies.ADDRESS_NOT_UTF8
    s.feed("DATA\r\nSubject: gr\u00fc\u00dfe\r\nFrom: <J\u00f6rg@smtpd.com>\r\n\r\nhi\r\n.\r\n".encode())
    envelope = s.pending
    assert envelope.smtputf8 and envelope.sender == "J\u00f6rg@smtpd.com"
    assert [(r.address, r.folder) for r in envelope.recipients] == [
        ("Jo\u0308RG@smtpd.com", "j\u00f6rg"), ("\u7528\u6237@\u4f8b\u3048.jp", "\u7528\u6237"),
    ]
    assert envelope.protocol == "UTF8SMTP"


def test_smtputf8_takes_no_value_and_the_next_transaction_is_ascii_again():
    s = new_session()
    assert s.feed(b"MAIL FROM:<a@smtpd.com> SMTPUTF8=yes\r\n").startswith(b"501 5.5.4")
    s.feed(b"MAIL FROM:<a@smtpd.com> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@smtpd.com>\r\n")
    assert s.feed("RCPT TO:<\u00e9@smtpd.com>\r\n".encode()) == replies.UTF8_NEEDS_SMTPUTF8


# ------------------------------------------------------------ U-label domains
@pytest.mark.parametrize("domain, ace", [
    ("stra\u00dfe.de", "xn--strae-oqa.de"),  # IDNA 2008: ß is a letter of its own, not "ss"
    ("\u03c2\u03bf\u03c6\u03bf\u03c2.gr", "xn--0xaahcs.gr"),  # final sigma kept, not mapped to σ
    ("M\u00dcNCHEN.de", "xn--mnchen-3ya.de"),  # upper case: the same domain, lowercased
    ("mu\u0308nchen.de", "xn--mnchen-3ya.de"),  # decomposed: the same domain, composed
    ("\u4f8b\u3048.jp", "xn--r8jz45g.jp"),
    ("Jo\u0308rg.Example", "xn--jrg-sna.example"),
])
def test_u_label_domains_take_their_idna_2008_a_labels(domain, ace):
    assert smtputf8.ascii_domain(domain) == ace


# Characters that IDNA 2003 (and UTS 46) silently map to something else or
# to nothing: the A-label form would name another domain than the one written.
@pytest.mark.parametrize("domain", [
    "ex\u00adample.\u00e9x",  # soft hyphen
    "a\u200bb.\u00e9x",  # zero width space
    "\uff45\uff58.\u00e9x",  # full-width letters
    "\u4f8b\u3048\u3002jp",  # ideographic full stop as a dot
    "\u2160.\u00e9x",  # ROMAN NUMERAL ONE, a compatibility character
    "\u00e9x..de", "\u00e9x.de.", "-\u00e9x.de", "\u00e9" * 64 + ".de",
])
def test_domains_idna_2008_refuses_or_that_would_change_are_refused(domain):
    assert smtputf8.ascii_domain(domain) is None


def test_a_domain_with_sharp_s_is_not_the_domain_with_ss():
    s = Wired(Session("mx.test", frozenset({"strasse.de"}), Limits(), lambda key: 0))
    s.feed(b"EHLO c\r\n")
    assert s.feed("MAIL FROM:<J\u00f6rg@strasse.de> SMTPUTF8\r\n".encode()) == replies.SENDER_OK
    assert s.feed("RCPT TO:<bob@stra\u00dfe.de>\r\n".encode()) == replies.RELAY_DENIED
    assert s.feed("RCPT TO:<bob@strasse.de>\r\n".encode()) == replies.RECIPIENT_OK
    s = Wired(Session("mx.test", frozenset({"xn--strae-oqa.de"}), Limits(), lambda key: 0))
    s.feed(b"EHLO c\r\n")
    assert s.feed("MAIL FROM:<a@stra\u00dfe.de> SMTPUTF8\r\n".encode()) == replies.SENDER_OK
    assert s.feed("RCPT TO:<bob@Stra\u00dfe.de>\r\n".encode()) == replies.RECIPIENT_OK


@pytest.mark.parametrize("tls, login, protocol", [
    (False, "", "UTF8SMTP"), (True, "", "UTF8SMTPS"), (False, "alice", "UTF8SMTPA"), (True, "alice", "UTF8SMTPSA"),
])
def test_received_names_the_protocol_per_rfc_6531(tls, login, protocol):
    info = object() if tls else None
    envelope = Envelope("c", "a@b", tls=info, login=login)
    assert envelope.protocol == protocol.replace("UTF8SMTP", "ESMTP")
    envelope.smtputf8 = True  # as MAIL ... SMTPUTF8 sets it
    assert envelope.protocol == protocol
