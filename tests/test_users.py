"""The users file: Dovecot's passwd-file format, slow hashes only, and the
hashes Dovecot itself writes and reads."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_smtpd import users
from prefork_smtpd.users import (
    UserEntry,
    UsersFileError,
    hash_password,
    load_users,
    name_problem,
    parse_line,
    parse_users,
    verify_password,
)

# Hashing is slow on purpose: make each hash once per test run.
_HASHES: dict[tuple[str, str], str] = {}


def hashed(password: str, scheme: str = "ARGON2ID") -> str:
    if (password, scheme) not in _HASHES:
        _HASHES[password, scheme] = hash_password(password, scheme)
    return _HASHES[password, scheme]


# ------------------------------------------------------------------ hashing
def test_argon2id_hash_has_dovecot_parameters():
    field = hashed("secret")
    assert field.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
    scheme, h = users.parse_password_field(field, "t")
    assert verify_password(scheme, h, "secret")
    assert not verify_password(scheme, h, "Secret")
    assert not verify_password(scheme, h, "")


def test_blf_crypt_hash_is_2y():
    field = hashed("secret", "BLF-CRYPT")
    assert field.startswith("{BLF-CRYPT}$2y$12$")
    scheme, h = users.parse_password_field(field, "t")
    assert verify_password(scheme, h, "secret")
    assert not verify_password(scheme, h, "secreT")


def test_scheme_name_is_case_insensitive():
    assert hash_password("x", "blf-crypt").startswith("{BLF-CRYPT}$2y$")


def test_hash_refuses_empty_unknown_and_long_bcrypt():
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
    with pytest.raises(ValueError, match="unsupported scheme"):
        hash_password("x", "SHA512-CRYPT")
    with pytest.raises(ValueError, match="72 octets"):
        hash_password("x" * 73, "BLF-CRYPT")
    # Argon2id reads the whole password.
    long_field = hash_password("y" * 500)
    assert verify_password(*users.parse_password_field(long_field, "t"), "y" * 500)
    assert not verify_password(*users.parse_password_field(long_field, "t"), "y" * 499)


def test_bcrypt_verification_cuts_at_72_octets_like_dovecot():
    # A hash of a 72-octet password matches any password sharing those 72
    # octets: what Dovecot's crypt_blowfish does with longer passwords.
    field = hashed("z" * 72, "BLF-CRYPT")
    scheme, h = users.parse_password_field(field, "t")
    assert verify_password(scheme, h, "z" * 72)
    assert verify_password(scheme, h, "z" * 100)
    assert not verify_password(scheme, h, "z" * 71)


def test_argon2id_hash_with_other_parameters_is_accepted():
    # argon2-cffi's own defaults (4 lanes); Dovecot 2.3 verifies these too.
    import argon2

    other = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=4).hash("secret")
    table = parse_users(f"alice:{{ARGON2ID}}{other}\n")
    assert table.verify("alice", "secret")
    assert not table.verify("alice", "secreT")


def test_verify_unicode_password():
    field = hashed("pässwörd ✓")
    assert verify_password(*users.parse_password_field(field, "t"), "pässwörd ✓")


def test_broken_hash_verifies_false_without_raising():
    assert not verify_password("ARGON2ID", "$argon2id$garbage", "x")
    assert not verify_password("BLF-CRYPT", "$2y$05$short", "x")
    assert not verify_password("SHA1", "whatever", "x")


# ------------------------------------------------------------------ parsing
@pytest.mark.slow
def test_parse_file_with_comments_blank_lines_and_dovecot_fields():
    a = hashed("alpha")
    b = hashed("bravo", "BLF-CRYPT")
    text = (
        "# users for smtpd.com\n"
        "\n"
        "   \n"
        f"alice:{a}\n"
        f"bob@smtpd.com:{b}:1000:1000:Bob:/home/bob:/bin/false:userdb_quota_rule=*:storage=1G\r\n"
        "# the end"
    )
    table = parse_users(text, "users")
    assert len(table) == 2
    assert table.names() == ["alice", "bob@smtpd.com"]
    assert "ALICE" in table and "Bob@SMTPD.com" in table and "carol" not in table
    bob = table.get("bob@smtpd.com")
    assert bob.scheme == "BLF-CRYPT"
    assert bob.rest == ":1000:1000:Bob:/home/bob:/bin/false:userdb_quota_rule=*:storage=1G"
    assert bob.line() == f"bob@smtpd.com:{b}:1000:1000:Bob:/home/bob:/bin/false:userdb_quota_rule=*:storage=1G"
    assert table.verify("alice", "alpha")
    assert table.verify("Alice", "alpha")  # names compare in lowercase, as Dovecot's %Lu
    assert not table.verify("alice", "bravo")
    assert table.verify("bob@smtpd.com", "bravo")


def test_scheme_prefix_is_case_insensitive_and_normalised():
    field = hashed("alpha").replace("{ARGON2ID}", "{argon2id}")
    entry = parse_line(f"alice:{field}", "f:1")
    assert entry.scheme == "ARGON2ID"
    assert entry.line() == f"alice:{hashed('alpha')}"


@pytest.mark.parametrize(
    "line, reason",
    [
        ("alice:{PLAIN}secret", "plaintext password for 'alice' ({PLAIN}) refused"),
        ("alice:{CLEAR}secret", "plaintext password for 'alice' ({CLEAR}) refused"),
        ("alice:{plain}secret", "plaintext password for 'alice' ({PLAIN}) refused"),
        ("alice:{SHA512-CRYPT}$6$abc$def", "unsupported scheme {SHA512-CRYPT} for 'alice'"),
        ("alice:{MD5}x", "unsupported scheme {MD5}"),
        ("alice:$2y$05$0NNvVvpF34yXdFGY8COdROe2p5gDyRgxVMFdHQHALSEtoQct4tsOW", "no {SCHEME} prefix"),
        ("alice:", "empty password field for 'alice'"),
        ("alice::1000:1000", "empty password field"),
        ("alice", "no password field for 'alice'"),
        (":{ARGON2ID}x", "empty name"),
        ("al ice:{ARGON2ID}x", "not a mailbox name"),
        ("al\x01ice:{ARGON2ID}x", "control character"),
        ("a..b:{ARGON2ID}x", "not a mailbox name"),
        ("a@b@c:{ARGON2ID}x", "not a mailbox name"),
        ("x" * 65 + ":{ARGON2ID}x", "name too long"),
        ("alice:{BLF-CRYPT}$2y$05$tooshort", "bad {BLF-CRYPT} hash for 'alice'"),
        ("alice:{BLF-CRYPT}$1$salt$hash", "bad {BLF-CRYPT} hash"),
        ("alice:{ARGON2ID}$argon2id$v=19$junk", "bad {ARGON2ID} hash for 'alice'"),
        ("alice:{ARGON2ID}$argon2i$v=19$m=65536,t=3,p=1$MDEyMzQ1Njc4OWFiY2RlZg$" + "A" * 43, "not argon2id"),
    ],
)
def test_bad_lines_are_refused_with_line_number(line, reason):
    text = "# header\n\n" + line + "\n"
    with pytest.raises(UsersFileError) as err:
        parse_users(text, "/etc/prefork-smtpd/users")
    message = str(err.value)
    assert message.startswith("/etc/prefork-smtpd/users:3: "), message
    assert reason in message
    assert "\n" not in message


def test_duplicate_name_refused_case_insensitively():
    a = hashed("alpha")
    with pytest.raises(UsersFileError, match=r"f:4: 'ALICE' already defined on line 2"):
        parse_users(f"#\nalice:{a}\nbob:{a}\nALICE:{a}\n", "f")


def test_a_non_ascii_name_never_matches_a_user_by_lowercasing():
    # Names are ASCII (name_problem); Unicode lowercasing maps the Kelvin
    # sign U+212A to "k", so "\u212aATE" found kate: a login under a name
    # that looks like another in the log.
    table = parse_users(f"kate:{hashed('pw')}\n")
    assert table.verify("KATE", "pw") and "Kate" in table
    assert not table.verify("\u212aATE", "pw")
    assert "\u212aate" not in table and table.get("\u212aate") is None


def test_line_numbers_count_lf_only():
    # A form feed is not a line break for Dovecot; it is a bad name here.
    with pytest.raises(UsersFileError, match=r"^f:2: "):
        parse_users("#\n\x0cx:{PLAIN}y\n", "f")


def test_load_users_file_errors(tmp_path):
    with pytest.raises(UsersFileError, match=r"missing: No such file or directory"):
        load_users(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_bytes(b"# ok\n# still ok\nb\xffob:{ARGON2ID}x\n")
    with pytest.raises(UsersFileError, match=r"bad:3: not UTF-8 text"):
        load_users(str(bad))
    with pytest.raises(UsersFileError, match="Is a directory"):
        load_users(str(tmp_path))


def test_load_users_reads_a_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{hashed('alpha')}\n")
    table = load_users(str(path))
    assert table.source == str(path)
    assert table.verify("alice", "alpha")


def test_empty_file_is_an_empty_table():
    table = parse_users("# nobody yet\n")
    assert len(table) == 0
    assert not table.verify("alice", "x")


def test_unknown_user_is_checked_against_a_dummy_hash(monkeypatch):
    # The reply for an unknown name must cost a full hash check, or its
    # speed would tell an attacker which names exist.
    calls = []
    real = users.verify_password

    def spy(scheme, h, password):
        calls.append(scheme)
        return real(scheme, h, password)

    users._dummy_entry.cache_clear()
    users.warm_up()
    # After warm_up the first unknown name costs one check, no extra hashing.
    monkeypatch.setattr(users, "hash_password", lambda *a: pytest.fail("hashed during a check"))
    monkeypatch.setattr(users, "verify_password", spy)
    table = parse_users(f"alice:{hashed('alpha', 'BLF-CRYPT')}\n")
    assert not table.verify("mallory", "alpha")
    assert calls == ["ARGON2ID"]
    assert table.verify("alice", "alpha")
    assert calls == ["ARGON2ID", "BLF-CRYPT"]


def test_entry_repr_hides_the_hash():
    entry = UserEntry("alice", "ARGON2ID", "$argon2id$secret-looking")
    assert "secret-looking" not in repr(entry)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("alice", True),
        ("alice@smtpd.com", True),
        ("first.last+tag@mail.smtpd.com", True),
        ("o'brien", True),
        ("", False),
        ("a:b", False),
        ("a\tb", False),
        ("a\x7fb", False),
        (".alice", False),
        ("alice.", False),
        ("alice@", False),
        ("@smtpd.com", False),
        ("alice@-bad.com", False),
        ("a/b", False),
        ('"quoted"', False),
        ("jörg", False),
        ("#alice", False),  # the users file's line would be a comment
        ("a#b", True),
        ("x" * 64 + "@smtpd.com", True),
        ("x" * 65 + "@smtpd.com", False),
        ("x@" + ".".join(["d" * 60] * 5), False),  # over 254 in all
    ],
)
def test_name_problem(name, ok):
    assert (name_problem(name) is None) == ok


A_BCRYPT_HASH = "$2b$04$" + "a" * 53  # the shape parse_line checks; never verified here


@settings(max_examples=300)
@given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=70))
def test_every_name_taken_is_read_back_from_its_line(name):
    """What the users tool writes, the server reads: a name is taken only if its line parses back to it."""
    if name_problem(name) is None:
        entry = parse_line(UserEntry(name, "BLF-CRYPT", A_BCRYPT_HASH).line(), "f:1")
        assert entry is not None and entry.name == name


@pytest.mark.slow
@settings(max_examples=300)
@given(st.text(max_size=300))
def test_random_lines_parse_or_refuse_cleanly(line):
    # Any line either parses or raises UsersFileError with a one-line reason.
    try:
        entry = parse_line(line, "f:1")
    except UsersFileError as exc:
        assert str(exc).startswith("f:1: ")
    else:
        if entry is not None:
            assert name_problem(entry.name) is None
            assert entry.scheme in users.SCHEMES


# ------------------------------------------------- Dovecot compatibility
DOVEADM = shutil.which("doveadm") or shutil.which("doveadm", path="/usr/bin:/usr/sbin")
needs_doveadm = pytest.mark.skipif(
    DOVEADM is None, reason="doveadm not installed (Debian package dovecot-core): Dovecot compatibility not checked"
)


def doveadm_verify(field: str, password: str) -> bool:
    proc = subprocess.run([DOVEADM, "pw", "-t", field, "-p", password], capture_output=True, text=True, timeout=60)
    verified = proc.returncode == 0 and "(verified)" in proc.stdout + proc.stderr
    assert verified or proc.returncode != 0, (proc.stdout, proc.stderr)
    return verified


def doveadm_hash(scheme: str, password: str) -> str:
    proc = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout.strip()


@needs_doveadm
@pytest.mark.parametrize("scheme", ["ARGON2ID", "BLF-CRYPT"])
@pytest.mark.parametrize("password", ["secret", "pässwörd ✓ with spaces"])
def test_dovecot_accepts_our_hashes(scheme, password):
    field = hashed(password, scheme)
    assert doveadm_verify(field, password)
    assert not doveadm_verify(field, password + "x")


@needs_doveadm
@pytest.mark.parametrize("scheme", ["ARGON2ID", "BLF-CRYPT"])
@pytest.mark.parametrize("password", ["secret", "pässwörd ✓ with spaces"])
def test_we_accept_dovecot_hashes(scheme, password):
    field = doveadm_hash(scheme, password)
    assert field.startswith("{" + scheme + "}")
    table = parse_users(f"# written by doveadm pw\nalice:{field}::::::\n", "f")
    assert table.verify("alice", password)
    assert not table.verify("alice", password + "x")
