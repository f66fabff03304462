"""A real Dovecot serves prefork-smtpd's Maildir store over IMAP and POP3.

The shipped deploy/dovecot/dovecot.conf is started as it is, with only its
paths, ports and user names pointed into a temporary folder: prefork-smtpd
runs as an unprivileged user (as its systemd unit does), Dovecot's master
runs as root and serves mail as that same user (a static userdb), and both read
one users file written by ``prefork-smtpd-users add --stdin``.

Needs root (to run the two servers as other users) and the Debian packages
dovecot-core, dovecot-imapd and dovecot-pop3d; ``run-tests`` installs them
without starting the system's Dovecot, which is never touched.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import re
import shutil
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from harness import Server, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "deploy" / "dovecot" / "dovecot.conf"

# The unprivileged user that owns the mail, as the prefork-smtpd user does in
# a deployment. nobody exists everywhere; no account is created for a test.
MAIL_USER = "nobody"
DOVECOT_PROGRAMS = {"imap": "dovecot-imapd", "pop3": "dovecot-pop3d"}
DOVECOT = shutil.which("dovecot", path=os.environ.get("PATH", "") + ":/usr/sbin")
LIBEXEC_DIRS = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))


def why_not_runnable() -> str | None:
    """Why these tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root: prefork-smtpd and Dovecot's mail processes run as another user, as deployed"
    if DOVECOT is None:
        return "dovecot is not installed (Debian package dovecot-core)"
    for program, package in DOVECOT_PROGRAMS.items():
        if not any((folder / program).exists() for folder in LIBEXEC_DIRS):
            return f"Dovecot's {program} server is not installed (Debian package {package})"
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        return f"no user {MAIL_USER!r} to own the mail"
    return None


pytestmark = pytest.mark.skipif(why_not_runnable() is not None, reason=why_not_runnable() or "")


def existing_user(*names: str) -> str:
    """The first of ``names`` that is a user here."""
    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    raise LookupError(f"none of {names} exists")


def users_command(users_file: Path, *args: str, password: str | None = None) -> None:
    """Run prefork-smtpd-users on ``users_file``, the password on stdin."""
    beside = Path(sys.executable).parent / "prefork-smtpd-users"
    script = str(beside) if beside.exists() else shutil.which("prefork-smtpd-users")
    assert script, "prefork-smtpd-users is not installed (pip install -e .)"
    data = None if password is None else (password + "\n").encode()
    done = subprocess.run([script, "--file", str(users_file), *args], input=data, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()


# ------------------------------------------------------------ the config
def set_setting(text: str, key: str, *values: str) -> str:
    """Give the ``key = ...`` lines of the config ``values``, in order; there
    must be exactly as many lines, so a changed shipped file fails loudly."""
    pattern = re.compile(rf"^(\s*){re.escape(key)} = .*$", re.MULTILINE)
    found = pattern.findall(text)
    assert len(found) == len(values), f"{SHIPPED_CONFIG.name}: {len(found)} lines set {key}, expected {len(values)}"
    remaining = iter(values)
    return pattern.sub(lambda m: f"{m.group(1)}{key} = {next(remaining)}", text)


def dovecot_config(shipped: str, *, root: Path, ports: dict[str, int], mail_group: str) -> str:
    """The shipped config with its paths, ports and users moved into ``root``:
    every other line, the user model included, is tested as shipped."""
    text = set_setting(shipped, "listen", "127.0.0.1")
    text = set_setting(text, "mail_location", f"maildir:{root}/smtpd/mail_dir/%n")
    # The passdb's users file, the static userdb's owner of the mail.
    text = set_setting(text, "args", f"{root}/etc/users", f"uid={MAIL_USER} gid={mail_group}")
    text = set_setting(text, "extra_groups", mail_group)
    text = set_setting(text, "ssl_cert", f"<{root}/tls/cert.pem")
    text = set_setting(text, "ssl_key", f"<{root}/tls/key.pem")
    for name, shipped_port in (("imap", 143), ("imaps", 993), ("pop3", 110), ("pop3s", 995)):
        pattern = re.compile(rf"(inet_listener {name} \{{\s*port = ){shipped_port}\b")
        text, found = pattern.subn(rf"\g<1>{ports[name]}", text)
        assert found == 1, f"{SHIPPED_CONFIG.name}: no listener {name} on port {shipped_port}"
    # Everything else Dovecot keeps stays inside root, apart from the system's
    # instance; its own users for login and internal processes.
    text += f"""
base_dir = {root}/dovecot/run
state_dir = {root}/dovecot/state
log_path = {root}/dovecot/log.txt
instance_name = prefork-smtpd-test-{os.getpid()}
default_internal_user = {existing_user("dovecot", MAIL_USER)}
default_login_user = {existing_user("dovenull", MAIL_USER)}
auth_verbose = yes
"""
    return text


# ------------------------------------------------------------ clients
# Dovecot delays each failed login from an address longer than the last (2 s,
# then 4, 8, up to 15 s more: its auth penalty). Tests that fail logins on
# purpose send each from its own loopback address (127.0.0.0/8 is all local).
class IMAP4FromSource(imaplib.IMAP4_SSL):
    def __init__(self, source: str, *args, **kw) -> None:
        self.source = source
        super().__init__(*args, **kw)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class POP3FromSource(poplib.POP3_SSL):
    def __init__(self, source: str, *args, **kw) -> None:
        self.source = source
        super().__init__(*args, **kw)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


# ------------------------------------------------------------ the two servers
@dataclass
class MailHost:
    root: Path
    smtpd: Server
    dovecot: subprocess.Popen
    ports: dict[str, int]
    users_file: Path
    ca: trustme.CA

    @property
    def mail_dir(self) -> Path:
        return self.smtpd.mail_dir

    def dovecot_log(self) -> str:
        try:
            return (self.root / "dovecot" / "log.txt").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def imap(self, user: str, password: str, source: str = "127.0.0.1") -> imaplib.IMAP4_SSL:
        client = IMAP4FromSource(source, "127.0.0.1", self.ports["imaps"], ssl_context=self.tls(), timeout=60)
        client.login(user, password)
        return client

    def pop3(self, user: str, password: str, source: str = "127.0.0.1") -> poplib.POP3_SSL:
        client = POP3FromSource(source, "127.0.0.1", self.ports["pop3s"], context=self.tls(), timeout=60)
        client.user(user)
        client.pass_(password)
        return client

    def add_user(self, name: str, password: str, *extra: str) -> None:
        users_command(self.users_file, "add", name, "--stdin", *extra, password=password)

    def send(self, recipient: str, message: bytes) -> bytes:
        """Deliver ``message`` (CRLF lines, not dot-stuffed) over SMTP; return
        the file the store wrote, read from new/ before any reader moved it."""
        folder = recipient.split("@")[0]
        before = set(self.smtpd.stored(folder))
        client = self.smtpd.client()
        try:
            assert client.cmd("EHLO client.test")[0] == 250
            stuffed = re.sub(rb"(?m)^\.", b"..", message)
            code, text = client.mail("sender@smtpd.com", [recipient], stuffed.removesuffix(b"\r\n"))
            assert code == 250, text
            client.cmd("QUIT")
        finally:
            client.close()
        (new,) = set(self.smtpd.stored(folder)) - before
        return new.read_bytes()

    def mail_files(self, folder: str) -> list[Path]:
        """The messages of ``folder`` a Maildir reader sees, in new/ and cur/."""
        return sorted(p for sub in ("new", "cur") for p in (self.mail_dir / folder / sub).iterdir())


def accepts(port: int, dovecot: subprocess.Popen, log) -> bool:
    assert dovecot.poll() is None, f"dovecot exited: {log()}"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def mail_host():
    # Not pytest's tmp_path: its parents are closed to the unprivileged users
    # the servers run as.
    root = Path(tempfile.mkdtemp(prefix="prefork-smtpd-dovecot-"))
    os.chmod(root, 0o755)
    mail_user = pwd.getpwnam(MAIL_USER)
    mail_group = grp.getgrgid(mail_user.pw_gid).gr_name
    servers: list = []
    try:
        # The users file, as deployed: root:<the server's group> 0640.
        (root / "etc").mkdir()
        users_file = root / "etc" / "users"
        users_file.write_text("# prefork-smtpd and Dovecot users\n")
        os.chown(users_file, 0, mail_user.pw_gid)
        os.chmod(users_file, 0o640)

        ca = trustme.CA()
        (root / "tls").mkdir(mode=0o700)
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        (root / "tls" / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(root / "tls" / "key.pem"))
        os.chmod(root / "tls" / "key.pem", 0o600)

        # The server's own folder belongs to its user, as systemd's
        # StateDirectory= does: it makes mail_dir and its log there itself.
        (root / "smtpd").mkdir()
        os.chown(root / "smtpd", mail_user.pw_uid, mail_user.pw_gid)
        smtpd = Server(root / "smtpd", "--recipient-delimiter", "+", "--plus-folders", user=MAIL_USER)
        servers.append(smtpd)

        (root / "dovecot").mkdir()
        ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s")}
        config = root / "dovecot" / "dovecot.conf"
        config.write_text(dovecot_config(SHIPPED_CONFIG.read_text(), root=root, ports=ports, mail_group=mail_group))
        dovecot = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(root / "dovecot" / "stderr.txt", "wb"),
        )
        servers.append(dovecot)
        host = MailHost(root, smtpd, dovecot, ports, users_file, ca)

        def log() -> str:
            return (root / "dovecot" / "stderr.txt").read_text(errors="replace") + host.dovecot_log()

        for port in ports.values():
            wait_until(lambda: accepts(port, dovecot, log), timeout=60, what="dovecot to listen")
        yield host
    finally:
        for server in servers:
            if isinstance(server, Server):
                server.kill()
            else:
                # Dovecot's master stops its children on TERM.
                server.terminate()
                server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)



# ------------------------------------------------------------ helpers
def message(number: int, recipient: str) -> bytes:
    """A mail with the lines SMTP and POP3 must stuff and unstuff (a lone
    dot, a leading dot), an indented line and a trailing space."""
    return (
        f"From: sender@smtpd.com\r\nTo: {recipient}\r\nSubject: mail {number}\r\n"
        f"Message-ID: <{number}@client.test>\r\n\r\n"
        "first line\r\n.\r\n.leading dot\r\n  indented, trailing space \r\n\r\nlast line\r\n"
    ).encode()


def as_served(stored: bytes) -> bytes:
    """The store writes LF line ends; IMAP and POP3 serve CRLF."""
    assert b"\r" not in stored
    return stored.replace(b"\n", b"\r\n")


def message_id(mail: bytes) -> str:
    return re.search(rb"(?im)^Message-ID: <([^>]*)>", mail).group(1).decode()


def fetch_all(client: imaplib.IMAP4, items: str) -> list[tuple[bytes, bytes]]:
    """(response head, literal) for every message of the selected mailbox."""
    typ, data = client.fetch("1:*", items)
    assert typ == "OK", data
    return [part for part in data if isinstance(part, tuple)]


def assert_private(folder: Path, owner: int) -> None:
    """Everything in ``folder`` (the server's and Dovecot's files alike) is
    the mail user's, and no folder is open to its group or the world."""
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        assert st.st_uid == owner, f"{path} belongs to uid {st.st_uid}"
        mode = stat.S_IMODE(st.st_mode)
        if path.name.startswith("dovecot-uidvalidity.") and st.st_size == 0:
            # Dovecot's empty marker, its name the UIDVALIDITY, is made
            # read-only (0444) on purpose; the 0700 folder keeps others out.
            continue
        assert mode & 0o077 == 0, f"{path} has mode {oct(mode)}"


# ------------------------------------------------------------ the tests
def test_imap_lists_and_fetches_every_mail_byte_for_byte(mail_host):
    mail_host.add_user("alice@smtpd.com", "alice's password")
    stored = {}
    for number in range(3):
        raw = mail_host.send("alice@smtpd.com", message(number, "alice@smtpd.com"))
        stored[message_id(raw)] = raw

    client = mail_host.imap("alice@smtpd.com", "alice's password")
    typ, data = client.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    fetched = fetch_all(client, "(RFC822.SIZE BODY.PEEK[])")
    client.logout()

    assert len(fetched) == 3
    served = {message_id(body): body for _, body in fetched}
    assert served == {key: as_served(raw) for key, raw in stored.items()}
    for head, body in fetched:
        assert int(re.search(rb"RFC822\.SIZE (\d+)", head).group(1)) == len(body)
    # Dovecot moved the mail from new/ to cur/ without changing a byte, and
    # everything it wrote belongs to the mail user, closed to others.
    folder = mail_host.mail_dir / "alice"
    assert list((folder / "new").iterdir()) == []
    assert sorted(p.read_bytes() for p in mail_host.mail_files("alice")) == sorted(stored.values())
    assert (folder / "dovecot-uidlist").exists()
    assert_private(mail_host.mail_dir, pwd.getpwnam(MAIL_USER).pw_uid)


def test_pop3_retrieves_byte_for_byte_and_deletes(mail_host):
    mail_host.add_user("bob@smtpd.com", "bob's password", "--scheme", "BLF-CRYPT")
    stored = {}
    for number in range(2):
        raw = mail_host.send("bob@smtpd.com", message(number, "bob@smtpd.com"))
        stored[message_id(raw)] = raw

    client = mail_host.pop3("bob@smtpd.com", "bob's password")
    count, total = client.stat()
    assert (count, total) == (2, sum(len(as_served(raw)) for raw in stored.values()))
    doomed = None
    for number in (1, 2):
        _, lines, _ = client.retr(number)
        body = b"\r\n".join(lines) + b"\r\n"
        assert body == as_served(stored[message_id(body)])
        assert client.list(number).split()[2] == str(len(body)).encode()
        if message_id(body) == "0@client.test":
            doomed = number
    client.dele(doomed)
    client.quit()

    # The deleted mail is gone from the folder, the other one is still there.
    kept = stored.pop("0@client.test")
    assert [p.read_bytes() for p in mail_host.mail_files("bob")] == list(stored.values())
    assert kept not in [p.read_bytes() for p in (mail_host.mail_dir / "bob").rglob("*") if p.is_file()]

    # A later delivery lands beside it and is seen by the next session.
    raw = mail_host.send("bob@smtpd.com", message(2, "bob@smtpd.com"))
    client = mail_host.pop3("bob@smtpd.com", "bob's password")
    assert client.stat()[0] == 2
    bodies = {b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in (1, 2)}
    client.quit()
    assert bodies == {as_served(raw), as_served(stored["1@client.test"])}


def test_imap_flags_survive_further_deliveries(mail_host):
    mail_host.add_user("carol@smtpd.com", "carol's password")
    for number in range(2):
        mail_host.send("carol@smtpd.com", message(number, "carol@smtpd.com"))

    client = mail_host.imap("carol@smtpd.com", "carol's password")
    client.select("INBOX")
    numbers = {message_id(body): head.split()[0].decode() for head, body in fetch_all(client, "(BODY.PEEK[HEADER])")}
    assert client.store(numbers["0@client.test"], "+FLAGS", r"(\Seen \Flagged)")[0] == "OK"
    assert client.store(numbers["1@client.test"], "+FLAGS", r"(\Seen)")[0] == "OK"
    client.logout()
    # Maildir keeps the flags in the file names: F(lagged), S(een).
    names = sorted(p.name.rsplit(":", 1)[1] for p in mail_host.mail_files("carol"))
    assert names == ["2,FS", "2,S"]

    for number in (2, 3):
        mail_host.send("carol@smtpd.com", message(number, "carol@smtpd.com"))

    client = mail_host.imap("carol@smtpd.com", "carol's password")
    client.select("INBOX")
    flags = {
        message_id(body): set(re.search(rb"FLAGS \(([^)]*)\)", head).group(1).decode().split())
        for head, body in fetch_all(client, "(FLAGS BODY.PEEK[HEADER])")
    }
    client.logout()
    assert flags == {
        "0@client.test": {r"\Seen", r"\Flagged"},
        "1@client.test": {r"\Seen"},
        "2@client.test": {r"\Recent"},
        "3@client.test": {r"\Recent"},
    }


def test_logins_follow_the_users_file(mail_host):
    """Both hash schemes prefork-smtpd-users writes log in to Dovecot; a
    wrong password or name does not; an edit takes effect at once."""
    mail_host.add_user("alice@smtpd.com", "alice's password")
    mail_host.add_user("bob", "bob's password", "--scheme", "BLF-CRYPT")
    lines = mail_host.users_file.read_text().splitlines()
    assert lines[1].startswith("alice@smtpd.com:{ARGON2ID}$argon2id$")
    assert lines[2].startswith("bob:{BLF-CRYPT}$2")

    mail_host.imap("alice@smtpd.com", "alice's password").logout()
    mail_host.imap("Alice@SMTPD.com", "alice's password").logout()  # names are lowercased
    mail_host.pop3("bob", "bob's password").quit()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        mail_host.imap("alice@smtpd.com", "bob's password", source="127.0.0.2")
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        mail_host.imap("nobody@smtpd.com", "alice's password", source="127.0.0.3")
    with pytest.raises(poplib.error_proto, match="ERR"):
        mail_host.pop3("bob", "alice's password", source="127.0.0.4")

    # The edit replaces the file and keeps its group, which Dovecot's auth
    # process reads it through: no reload needed either way.
    users_command(mail_host.users_file, "delete", "bob")
    mail_host.add_user("dave@smtpd.com", "dave's password")
    assert mail_host.users_file.stat().st_gid == pwd.getpwnam(MAIL_USER).pw_gid
    assert oct(mail_host.users_file.stat().st_mode & 0o777) == oct(0o640)
    with pytest.raises(poplib.error_proto, match="ERR"):
        mail_host.pop3("bob", "bob's password", source="127.0.0.5")
    mail_host.imap("dave@smtpd.com", "dave's password").logout()


def test_plain_ports_take_logins_after_starttls(mail_host):
    mail_host.add_user("erin@smtpd.com", "erin's password")
    raw = mail_host.send("erin@smtpd.com", message(0, "erin@smtpd.com"))

    imap = imaplib.IMAP4("127.0.0.1", mail_host.ports["imap"], timeout=60)
    imap.starttls(ssl_context=mail_host.tls())
    imap.login("erin@smtpd.com", "erin's password")
    imap.select("INBOX", readonly=True)
    assert [body for _, body in fetch_all(imap, "(BODY.PEEK[])")] == [as_served(raw)]
    imap.logout()

    pop3 = poplib.POP3("127.0.0.1", mail_host.ports["pop3"], timeout=60)
    pop3.stls(context=mail_host.tls())
    pop3.user("erin@smtpd.com")
    pop3.pass_("erin's password")
    assert pop3.stat()[0] == 1
    pop3.quit()


def test_a_folder_dovecot_made_takes_mail(mail_host):
    """A user who logs in before any mail came gets a folder from Dovecot;
    prefork-smtpd then delivers into it (--mailboxes existing counts it)."""
    mail_host.add_user("frank@smtpd.com", "frank's password")
    client = mail_host.imap("frank@smtpd.com", "frank's password")
    assert client.select("INBOX") == ("OK", [b"0"])
    client.logout()
    assert_private(mail_host.mail_dir / "frank", pwd.getpwnam(MAIL_USER).pw_uid)

    raw = mail_host.send("frank@smtpd.com", message(0, "frank@smtpd.com"))
    client = mail_host.imap("frank@smtpd.com", "frank's password")
    client.select("INBOX")
    assert [body for _, body in fetch_all(client, "(BODY.PEEK[])")] == [as_served(raw)]
    client.logout()


def test_an_smtputf8_mail_is_served_byte_for_byte(mail_host):
    """RFC 6531/6532: a UTF-8 sender and UTF-8 headers, stored as sent, read
    back through Dovecot's IMAP exactly as the store wrote them."""
    mail_host.add_user("alice@smtpd.com", "alice's password")
    sender = "jörg@smtpd.com"
    mail = (
        f"From: Jörg Müller <{sender}>\r\nTo: alice@smtpd.com\r\nSubject: Grüße, 日本語\r\n"
        "Message-ID: <utf8@client.test>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Schöne Grüße\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", mail_host.smtpd.port, timeout=60) as client:
        refused = client.sendmail(sender, ["alice@smtpd.com"], mail, mail_options=["SMTPUTF8"])
    assert refused == {}
    (stored,) = mail_host.smtpd.stored("alice")
    raw = stored.read_bytes()
    assert b"with UTF8SMTP id " in raw and "Subject: Grüße, 日本語\n".encode() in raw

    client = mail_host.imap("alice@smtpd.com", "alice's password")
    assert client.select("INBOX") == ("OK", [b"1"])
    ((_, body),) = fetch_all(client, "(BODY.PEEK[])")
    client.logout()
    assert body == as_served(raw)


def test_plus_folders_are_the_imap_folders_their_details_name(mail_host):
    """Dovecot reads Maildir++ folder names as modified UTF-7: a folder the
    server made as ".a&b" or with raw UTF-8 was a folder no IMAP client could
    open ("Mailbox doesn't exist")."""
    mail_host.add_user("alice@smtpd.com", "alice's password")
    with smtplib.SMTP("127.0.0.1", mail_host.smtpd.port, timeout=60) as client:
        for detail in ("Invoices", "a&b", "Rechnungen-M\u00e4rz", "Inbox", "~x"):
            assert client.sendmail("bob@smtpd.com", [f"alice+{detail}@smtpd.com"], message(0, "alice@smtpd.com"),
                                   mail_options=["SMTPUTF8"]) == {}
    client = mail_host.imap("alice@smtpd.com", "alice's password")
    typ, listed = client.list()
    assert typ == "OK", listed
    names = {line.rsplit(b" ", 1)[-1].strip(b'"') for line in listed}
    assert {b"invoices", b"a&-b", b"rechnungen-m&AOQ-rz"} <= names, names
    for folder in ("invoices", "a&-b", "rechnungen-m&AOQ-rz"):  # as IMAP names them on the wire
        assert client.select(f'"{folder}"') == ("OK", [b"1"]), folder
    # "inbox" is Dovecot's own INBOX and "~x" no name it takes: those went to the inbox itself.
    assert client.select("INBOX") == ("OK", [b"2"])
    client.logout()
