"""The server's TLS: one checked ``ssl.SSLContext`` for STARTTLS and implicit TLS.

Theory of operation
-------------------
``load_server_context(cert, key)`` reads the certificate chain and the key,
checks them, and builds the context every TLS listener and every STARTTLS
upgrade uses (``loop.start_tls(..., server_side=True)``, or ``ssl=`` on an
implicit-TLS listener). Whatever is wrong comes back as one line in a
``TLSConfigError``, naming the file: missing, unreadable, not PEM, an
encrypted key (a server cannot type a passphrase), a key that does not
match the certificate.

An expired (or not yet valid) certificate is *not* refused: it is reported
in ``CertificateInfo.warnings`` for the log. Mail between servers uses
opportunistic TLS (RFC 7435): senders rarely check the certificate, and
encryption with an expired certificate beats the plaintext a refusal would
force; refusing would also turn a missed renewal into a server that does
not start. The operator sees the warning at every start and reload.

``TLSContextHolder`` keeps the context in use and rebuilds it on reload
(new certificate after a renewal): the new context replaces the old only if
the new pair loads and checks; otherwise the old one stays and ``reload``
returns the reason. Connections already in TLS keep the context they
started with.

``describe_tls(ssl_object)`` says what a session negotiated, for the
``Received`` header and the log.

The policy: TLS 1.2 and 1.3 only (RFC 8996 retired 1.0 and 1.1), no TLS
compression (CRIME), the server's cipher order (a client offering a weak
suite first does not get it), no TLS 1.2 renegotiation (a client could
make the server redo handshakes for free), and for TLS 1.2 only forward
secret AEAD suites (Mozilla's "intermediate" list).
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
import stat
from dataclasses import dataclass

from .textfile import read_regular_file

# Mozilla's "intermediate" TLS 1.2 suites (TLS 1.3 suites are all fine and
# set apart by OpenSSL). ECDSA and RSA certificates both work; the DHE
# suites are inert unless DH parameters are loaded.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_KEY_BLOCK = re.compile(rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----")


class TLSConfigError(Exception):
    """A certificate or key that cannot serve; the message is one line."""


@dataclass(frozen=True)
class CertificateInfo:
    """What was loaded, for the log and for metrics."""

    certfile: str
    keyfile: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    chain_length: int  # certificates in the file, the server's own first
    warnings: tuple[str, ...] = ()


# ----------------------------------------------------------- the context
def server_context() -> ssl.SSLContext:
    """A server context with this server's TLS policy and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(TLS12_CIPHERS)
    context.verify_mode = ssl.CERT_NONE  # no client certificates asked for
    return context


def load_server_context(
    certfile: str, keyfile: str | None = None, *, now: datetime.datetime | None = None
) -> tuple[ssl.SSLContext, CertificateInfo]:
    """The checked context for ``certfile`` (the server's certificate, then
    its intermediates) and ``keyfile`` (or the key inside ``certfile``).

    Raises TLSConfigError with a one-line reason.
    """
    keyfile = keyfile or certfile
    cert_pem = _read(certfile, "certificate")
    key_pem = cert_pem if keyfile == certfile else _read(keyfile, "key")
    blocks = _CERT_BLOCK.findall(cert_pem)
    if not blocks:
        raise TLSConfigError(f"certificate {certfile}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    try:
        der = ssl.PEM_cert_to_DER_cert(blocks[0].decode("ascii"))
        not_before, not_after = certificate_validity(der)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TLSConfigError(f"certificate {certfile}: not a valid X.509 certificate ({exc})") from None
    key_kind = _KEY_BLOCK.search(key_pem)
    if not key_kind:
        raise TLSConfigError(f"key {keyfile}: no PEM private key (-----BEGIN PRIVATE KEY-----) in it")
    if key_kind.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise TLSConfigError(f"key {keyfile}: encrypted with a passphrase; store it unencrypted, readable by root only")

    context = server_context()
    try:
        # The password callback stops OpenSSL from prompting on a terminal.
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise TLSConfigError(_ssl_reason(exc, certfile, keyfile)) from None
    except OSError as exc:  # the files changed since we read them
        raise TLSConfigError(f"{exc.filename}: {exc.strerror or exc}") from None
    except _Encrypted:
        raise TLSConfigError(f"key {keyfile}: encrypted with a passphrase") from None

    now = now or datetime.datetime.now(datetime.UTC)
    warnings = []
    if now > not_after:
        warnings.append(f"certificate {certfile} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC")
    elif now < not_before:
        warnings.append(f"certificate {certfile} is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC")
    try:
        if os.stat(keyfile).st_mode & stat.S_IROTH:
            warnings.append(f"key {keyfile} is readable by every user of this machine")
    except OSError:
        pass
    info = CertificateInfo(certfile, keyfile, not_before, not_after, len(blocks), tuple(warnings))
    return context, info


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Encrypted


def _read(path: str, what: str) -> bytes:
    try:
        return read_regular_file(path)
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: {exc.strerror or exc}") from None


def _ssl_reason(exc: ssl.SSLError, certfile: str, keyfile: str) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"key {keyfile} does not match certificate {certfile}"
    if exc.reason in ("EE_KEY_TOO_SMALL", "CA_MD_TOO_WEAK", "CA_KEY_TOO_SMALL"):
        return f"certificate {certfile}: too weak for OpenSSL's security level ({exc.reason})"
    # OpenSSL says only "PEM lib" for a block it cannot decode.
    return f"cannot load certificate {certfile} with key {keyfile}: {exc.reason or exc}"


class TLSContextHolder:
    """The context in use; ``reload`` swaps it only for a good new one."""

    def __init__(self, certfile: str, keyfile: str | None = None) -> None:
        """Raises TLSConfigError if the pair cannot serve: refuse to start."""
        self.certfile = certfile
        self.keyfile = keyfile
        self._context, self._info = load_server_context(certfile, keyfile)

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    @property
    def info(self) -> CertificateInfo:
        return self._info

    def reload(self, certfile: str | None = None, keyfile: str | None = None) -> str | None:
        """Load the files again (or new ones); None if the new context is in
        use, else the reason the old one was kept."""
        if certfile is None:
            certfile, keyfile = self.certfile, self.keyfile
        try:
            context, info = load_server_context(certfile, keyfile)
        except TLSConfigError as exc:
            return f"{exc}; keeping the certificate loaded before"
        self.certfile, self.keyfile = certfile, keyfile
        self._context, self._info = context, info
        return None


# ------------------------------------------------------- a session's TLS
@dataclass(frozen=True)
class TLSSessionInfo:
    version: str  # "TLSv1.3"
    cipher: str  # OpenSSL's name: "TLS_AES_256_GCM_SHA384", "ECDHE-RSA-AES128-GCM-SHA256"
    bits: int  # secret bits of the cipher

    def received_comment(self) -> str:
        """For the Received header, as Postfix writes it (in parentheses
        after the ``by`` clause): ``using TLSv1.3 with cipher ... (256 bits)``."""
        return f"using {self.version} with cipher {self.cipher} ({self.bits} bits)"

    def log_fields(self) -> str:
        return f"tls={self.version} cipher={self.cipher} bits={self.bits}"


def describe_tls(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TLSSessionInfo | None:
    """What a finished handshake negotiated; None before one (or without TLS).

    Takes what ``transport.get_extra_info("ssl_object")`` returns.
    """
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    if cipher is None or version is None:
        return None
    name, _protocol, bits = cipher
    return TLSSessionInfo(version, name, int(bits or 0))


# ------------------------------------------------ reading the certificate
def certificate_validity(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) of a DER X.509 certificate, in UTC.

    The standard library has no public certificate parser, and these two
    dates sit at a fixed place (RFC 5280 4.1): Certificate SEQUENCE ->
    tbsCertificate SEQUENCE -> [0] version?, serialNumber, signature,
    issuer, validity SEQUENCE { notBefore, notAfter }. Raises ValueError.
    """
    tag, cert, _ = _der_item(der, 0)
    if tag != 0x30:
        raise ValueError("not a DER SEQUENCE")
    tag, tbs, _ = _der_item(cert, 0)
    if tag != 0x30:
        raise ValueError("no tbsCertificate")
    offset = 0
    tag, _, after = _der_item(tbs, offset)
    if tag == 0xA0:  # explicit version
        offset = after
    for _field in ("serialNumber", "signature", "issuer"):
        _, _, offset = _der_item(tbs, offset)
    tag, validity, _ = _der_item(tbs, offset)
    if tag != 0x30:
        raise ValueError("no validity")
    tag1, not_before, after = _der_item(validity, 0)
    tag2, not_after, _ = _der_item(validity, after)
    return _der_time(tag1, not_before), _der_time(tag2, not_after)


def _der_item(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """(tag, content, offset after) of the DER item at ``offset``."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    end = offset + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[offset:end], end


def _der_time(tag: int, value: bytes) -> datetime.datetime:
    text = value.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY
        parsed = datetime.datetime.strptime(text, "%y%m%d%H%M%SZ")
        if parsed.year >= 2050:
            parsed = parsed.replace(year=parsed.year - 100)
    elif tag == 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        parsed = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    else:
        raise ValueError("not a time")
    return parsed.replace(tzinfo=datetime.UTC)
