"""The server's TLS context: real handshakes against a test CA (trustme),
the policy, every way a certificate or key can be wrong, and reload."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import socket
import ssl
import threading
import warnings
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from prefork_smtpd import tls
from prefork_smtpd.tls import (
    TLSConfigError,
    TLSContextHolder,
    TLSSessionInfo,
    certificate_validity,
    describe_tls,
    load_server_context,
)

HOST = "mail.smtpd.com"
UTC = datetime.UTC


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(folder: Path, cert: trustme.LeafCert, stem: str = "server") -> tuple[str, str]:
    certfile, keyfile = folder / f"{stem}.crt", folder / f"{stem}.key"
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    os.chmod(keyfile, 0o600)
    return str(certfile), str(keyfile)


@pytest.fixture
def pair(tmp_path, ca) -> tuple[str, str]:
    return write_pair(tmp_path, ca.issue_cert(HOST))


def client_context(ca: trustme.CA, **versions) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    for name, value in versions.items():
        setattr(context, name, value)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> dict:
    """Both ends of one handshake over a socketpair: the server in a thread."""
    a, b = socket.socketpair()
    a.settimeout(60)
    b.settimeout(60)
    result: dict = {}

    def serve():
        try:
            with server.wrap_socket(a, server_side=True) as s:
                result["server"] = describe_tls(s)
                result["compression"] = s.compression()
                s.sendall(b"220 ready\r\n")
        except (ssl.SSLError, OSError) as exc:
            result["server_error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=HOST) as c:
            result["client"] = describe_tls(c)
            result["greeting"] = c.recv(100)
    except (ssl.SSLError, OSError) as exc:
        result["client_error"] = exc
    finally:
        thread.join(60)
        a.close()
        b.close()
    return result


# ------------------------------------------------------------ handshakes
def test_tls13_handshake_with_a_client_that_verifies(pair, ca):
    context, info = load_server_context(*pair)
    r = handshake(context, client_context(ca))
    assert "client_error" not in r and "server_error" not in r, r
    assert r["greeting"] == b"220 ready\r\n"
    assert r["server"].version == "TLSv1.3"
    assert r["server"] == r["client"]
    assert r["server"].bits >= 128
    assert r["compression"] is None
    assert info.warnings == ()
    assert info.chain_length == 1


def test_tls12_gets_a_forward_secret_aead_suite(pair, ca):
    context, _ = load_server_context(*pair)
    r = handshake(context, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert r["server"].version == "TLSv1.2", r
    assert r["server"].cipher.startswith("ECDHE-") and ("GCM" in r["server"].cipher or "CHACHA20" in r["server"].cipher)


def test_tls11_is_refused(pair, ca):
    context, _ = load_server_context(*pair)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 itself is deprecated
        old = client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_1, maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client would refuse TLS 1.1 on its own otherwise
    r = handshake(context, old)
    assert "server" not in r, r
    assert "UNSUPPORTED_PROTOCOL" in str(r["server_error"]) or "VERSION" in str(r["server_error"]), r


def test_cbc_suites_are_refused_in_tls12(pair, ca):
    # Python's default server list would take these (ECDH+AES).
    context, _ = load_server_context(*pair)
    client = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA")
    r = handshake(context, client)
    assert "server" not in r, r
    assert "NO_SHARED_CIPHER" in str(r["server_error"]), r


def test_server_chooses_the_cipher(pair, ca):
    # The client lists ChaCha20 first; the server's order puts AES-GCM first.
    context, _ = load_server_context(*pair)
    client = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    client.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
    r = handshake(context, client)
    assert r["server"].cipher == "ECDHE-ECDSA-AES128-GCM-SHA256", r


def test_policy_options(pair):
    context, _ = load_server_context(*pair)
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_RENEGOTIATION):
        assert context.options & option == option
    assert context.verify_mode == ssl.CERT_NONE
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all(name.startswith(("ECDHE-", "DHE-")) for name in tls12)
    assert all("GCM" in name or "CHACHA20" in name for name in tls12)


def test_intermediate_chain_is_served(tmp_path, ca):
    # Clients trust only the root: the server must send its intermediate.
    child = ca.create_child_ca()
    certfile, keyfile = write_pair(tmp_path, child.issue_cert(HOST))
    context, info = load_server_context(certfile, keyfile)
    assert info.chain_length == 2
    r = handshake(context, client_context(ca))
    assert r["server"] is not None and "client_error" not in r, r


def test_key_and_certificate_in_one_file(tmp_path, ca):
    cert = ca.issue_cert(HOST)
    both = tmp_path / "both.pem"
    both.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    os.chmod(both, 0o600)
    context, info = load_server_context(str(both))
    assert info.keyfile == str(both)
    assert handshake(context, client_context(ca))["server"] is not None


def test_starttls_upgrade_with_asyncio(pair, ca):
    """The path the worker takes: a plain connection, then loop.start_tls."""
    context, _ = load_server_context(*pair)
    seen: dict = {}

    async def main():
        upgraded = asyncio.Event()

        async def on_client(reader, writer):
            writer.write(b"220 ready for TLS\r\n")
            await writer.drain()
            await writer.start_tls(context)
            seen["info"] = describe_tls(writer.get_extra_info("ssl_object"))
            writer.write(b"250 secure\r\n")
            await writer.drain()
            upgraded.set()
            writer.close()

        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"220 ready for TLS\r\n"
            assert describe_tls(writer.get_extra_info("ssl_object")) is None  # plain so far
            await writer.start_tls(client_context(ca), server_hostname=HOST)
            assert await reader.readline() == b"250 secure\r\n"
            seen["client"] = describe_tls(writer.get_extra_info("ssl_object"))
            await asyncio.wait_for(upgraded.wait(), 60)
            writer.close()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert seen["info"] == seen["client"]
    assert seen["info"].version == "TLSv1.3"


# ------------------------------------------------------------ describing
def test_describe_tls_for_received_and_log():
    info = TLSSessionInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    assert info.received_comment() == "using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits)"
    assert info.log_fields() == "tls=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256"
    assert describe_tls(None) is None


def test_describe_tls_on_a_memory_bio_ssl_object(pair, ca):
    # asyncio's transports expose an SSLObject, not an SSLSocket.
    context, _ = load_server_context(*pair)
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = context.wrap_bio(server_in, server_out, server_side=True)
    client = client_context(ca).wrap_bio(client_in, client_out, server_hostname=HOST)
    assert describe_tls(server) is None  # before the handshake
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        client_in.write(server_out.read())
        server_in.write(client_out.read())
    info = describe_tls(server)
    assert info == describe_tls(client)
    assert info.version == "TLSv1.3"


# ------------------------------------------------------------ bad files
def test_missing_files(tmp_path, pair):
    certfile, keyfile = pair
    with pytest.raises(TLSConfigError, match=rf"^certificate {tmp_path}/nope.crt: No such file or directory$"):
        load_server_context(str(tmp_path / "nope.crt"), keyfile)
    with pytest.raises(TLSConfigError, match=rf"^key {tmp_path}/nope.key: No such file or directory$"):
        load_server_context(certfile, str(tmp_path / "nope.key"))
    with pytest.raises(TLSConfigError, match=r"Is a directory$"):
        load_server_context(str(tmp_path), keyfile)


def test_unreadable_file(tmp_path, pair):
    certfile, keyfile = pair
    os.chmod(keyfile, 0)
    if os.geteuid() != 0:
        with pytest.raises(TLSConfigError, match=rf"^key {keyfile}: Permission denied$"):
            load_server_context(certfile, keyfile)
        return
    # Root reads any file: check as an unprivileged user, in a child.
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_server_context(certfile, keyfile)
                message = "loaded"
            except TLSConfigError as exc:
                message = str(exc)
            os.write(writer, message.encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    assert message.endswith(": Permission denied"), message
    assert message.startswith(("certificate ", "key ")), message


def test_key_not_matching_certificate(tmp_path, ca):
    certfile, _ = write_pair(tmp_path, ca.issue_cert(HOST), "one")
    _, other_key = write_pair(tmp_path, ca.issue_cert(HOST), "two")
    with pytest.raises(TLSConfigError) as err:
        load_server_context(certfile, other_key)
    assert str(err.value) == f"key {other_key} does not match certificate {certfile}"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "no PEM certificate"),
        (b"hello\n", "no PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "not a valid X.509 certificate",
        ),
        (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "not a valid X.509 certificate"),
    ],
)
def test_certificate_not_pem(tmp_path, pair, content, reason):
    bad = tmp_path / "bad.crt"
    bad.write_bytes(content)
    with pytest.raises(TLSConfigError, match=rf"^certificate {bad}: {reason}"):
        load_server_context(str(bad), pair[1])


def test_der_certificate_is_not_pem(tmp_path, pair):
    certfile, keyfile = pair
    der = tmp_path / "server.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(Path(certfile).read_text()))
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        load_server_context(str(der), keyfile)


def test_key_not_pem_or_certificate_as_key(tmp_path, pair):
    certfile, _ = pair
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key\n")
    with pytest.raises(TLSConfigError, match=rf"^key {bad}: no PEM private key"):
        load_server_context(certfile, str(bad))
    with pytest.raises(TLSConfigError, match=rf"^key {certfile}: no PEM private key"):
        load_server_context(certfile, certfile)


def test_broken_key_body(tmp_path, pair):
    certfile, _ = pair
    bad = tmp_path / "broken.key"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError, match=rf"^cannot load certificate {certfile} with key {bad}: "):
        load_server_context(certfile, str(bad))


@pytest.mark.parametrize("form", ["PKCS8", "TraditionalOpenSSL"])
def test_encrypted_key_is_refused_without_prompting(tmp_path, ca, form):
    cert = ca.issue_cert(HOST)
    certfile, _ = write_pair(tmp_path, cert)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            getattr(serialization.PrivateFormat, form),
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted with a passphrase"):
        load_server_context(certfile, str(encrypted))


def test_encrypted_key_never_reaches_a_prompt(tmp_path, ca, monkeypatch):
    # Past the PEM check (say, a header we do not know), OpenSSL would ask
    # on the terminal; the password callback stops that.
    cert = ca.issue_cert(HOST)
    certfile, _ = write_pair(tmp_path, cert)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    monkeypatch.setattr(tls, "_KEY_BLOCK", re.compile(rb"-----BEGIN ENCRYPTED (PRIVATE KEY)-----"))
    with pytest.raises(TLSConfigError, match="encrypted with a passphrase"):
        load_server_context(certfile, str(encrypted))


def test_expired_certificate_loads_with_a_warning(tmp_path, ca):
    past = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    cert = ca.issue_cert(HOST, not_before=past - datetime.timedelta(days=90), not_after=past)
    certfile, keyfile = write_pair(tmp_path, cert)
    context, info = load_server_context(certfile, keyfile)
    assert info.not_after == past
    assert info.warnings == (f"certificate {certfile} expired on 2020-01-01 00:00:00 UTC",)
    # Still serves: opportunistic TLS with an expired certificate beats plaintext.
    client = client_context(ca)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    assert handshake(context, client)["server"] is not None


def test_not_yet_valid_certificate_warns(tmp_path, ca):
    future = datetime.datetime(2100, 1, 1, tzinfo=UTC)
    cert = ca.issue_cert(HOST, not_before=future, not_after=future + datetime.timedelta(days=90))
    _, info = load_server_context(*write_pair(tmp_path, cert))
    assert info.not_before == future
    assert len(info.warnings) == 1 and "not valid before 2100-01-01" in info.warnings[0]


def test_world_readable_key_warns(tmp_path, pair):
    certfile, keyfile = pair
    os.chmod(keyfile, 0o644)
    _, info = load_server_context(certfile, keyfile)
    assert info.warnings == (f"key {keyfile} is readable by every user of this machine",)


# ------------------------------------------------------------ reload
def test_reload_swaps_a_good_pair(tmp_path, ca, pair):
    holder = TLSContextHolder(*pair)
    first = holder.context
    renewed = ca.issue_cert(HOST, not_after=datetime.datetime(2999, 1, 1, tzinfo=UTC))
    write_pair(tmp_path, renewed)  # same file names, as after a renewal
    assert holder.reload() is None
    assert holder.context is not first
    assert holder.info.not_after == datetime.datetime(2999, 1, 1, tzinfo=UTC)
    assert handshake(holder.context, client_context(ca))["server"] is not None


def test_reload_keeps_the_old_context_on_a_bad_pair(tmp_path, ca, pair):
    certfile, keyfile = pair
    holder = TLSContextHolder(certfile, keyfile)
    first, first_info = holder.context, holder.info
    # A renewal that wrote the new certificate but not yet its key.
    Path(certfile).write_bytes(ca.issue_cert(HOST).cert_chain_pems[0].bytes())
    reason = holder.reload()
    assert reason == f"key {keyfile} does not match certificate {certfile}; keeping the certificate loaded before"
    assert holder.context is first and holder.info is first_info
    assert handshake(holder.context, client_context(ca))["server"] is not None
    # Once the key follows, the next reload takes both.
    fixed = ca.issue_cert(HOST)
    write_pair(tmp_path, fixed)
    assert holder.reload() is None
    assert holder.context is not first


def test_reload_with_new_paths(tmp_path, ca, pair):
    holder = TLSContextHolder(*pair)
    new_cert, new_key = write_pair(tmp_path, ca.issue_cert(HOST), "new")
    assert holder.reload(str(tmp_path / "missing.crt"), new_key).startswith("certificate ")
    assert holder.certfile == pair[0]
    assert holder.reload(new_cert, new_key) is None
    assert (holder.certfile, holder.keyfile) == (new_cert, new_key)
    assert holder.info.certfile == new_cert


def test_holder_refuses_a_bad_pair_at_start(tmp_path, pair):
    with pytest.raises(TLSConfigError, match="No such file"):
        TLSContextHolder(str(tmp_path / "none.crt"), pair[1])


# ------------------------------------------------------------ the dates
def test_certificate_validity_matches_a_full_parser(ca):
    for not_after in (
        datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),  # UTCTime
        datetime.datetime(2050, 1, 1, tzinfo=UTC),  # GeneralizedTime from 2050 on
        datetime.datetime(3000, 1, 1, tzinfo=UTC),
    ):
        # A notBefore in 1960 is the UTCTime "60...", which RFC 5280 reads
        # as 1960 where strptime's %y would say 2060.
        cert = ca.issue_cert(HOST, not_before=datetime.datetime(1960, 6, 1, tzinfo=UTC), not_after=not_after)
        pem = cert.cert_chain_pems[0].bytes()
        full = x509.load_pem_x509_certificate(pem)
        der = ssl.PEM_cert_to_DER_cert(pem.decode())
        assert certificate_validity(der) == (full.not_valid_before_utc, full.not_valid_after_utc)


@given(st.binary(max_size=300))
def test_certificate_validity_on_garbage_raises_only_value_error(data):
    try:
        certificate_validity(data)
    except ValueError:
        pass


_CERT_DER = ssl.PEM_cert_to_DER_cert(trustme.CA().cert_pem.bytes().decode())


@given(st.integers(min_value=0, max_value=len(_CERT_DER) - 1))
def test_certificate_validity_on_truncated_certificates(cut):
    with pytest.raises(ValueError):
        certificate_validity(_CERT_DER[:cut])
