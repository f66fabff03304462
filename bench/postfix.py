"""A throwaway Postfix instance: the durable contender of the benchmark.

Everything lives in one temporary folder: its own config directory (started
with ``postfix -c DIR``), queue, data directory, log and Maildir base, so the
system's Postfix (its /etc/postfix, queue and service) is never read or
touched. It listens on one loopback port with ``smtpd``, fsyncs each queue
file before its ``250`` (Postfix always does), and hands every mail to the
``virtual`` agent, which writes it into ``<maildir>/<local part>/new/``, the
same layout prefork-smtpd writes.

Settings that would otherwise throttle or slow it for reasons that are not
the job: ``in_flow_delay = 0`` (else smtpd sleeps when the queue manager
lags), ``default_process_limit = 100`` (else 100 is still the default, but
spelled out), no client rate limits, ``smtpd_error_sleep_time = 0``, no DNS
(``smtp_dns_support_level = disabled``, ``smtpd_peername_lookup = no``),
``queue_minfree = 0``, no chroot, and no ``pickup``/``postscreen``.
"""

from __future__ import annotations

import os
import pwd
import grp
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def main_cf(root: Path, domain: str, max_size: int, relayhost: str | None = None) -> str:
    nobody = pwd.getpwnam("nobody")
    # Mail for any other domain goes to the relay host when one is given
    # (the relay scenario: clients in mynetworks may relay); brackets: no MX
    # lookup, the address as it stands.
    relay = f"relayhost = [{relayhost.rpartition(':')[0]}]:{relayhost.rpartition(':')[2]}\n" if relayhost else ""
    return relay + f"""\
compatibility_level = 3.6
config_directory = {root / 'etc'}
queue_directory = {root / 'queue'}
data_directory = {root / 'data'}
command_directory = /usr/sbin
daemon_directory = {DAEMON_DIRECTORY}
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root / 'maillog'}
maillog_file_prefixes = {root}
myhostname = bench.example
mydomain = bench.example
myorigin = bench.example
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
local_recipient_maps =
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
in_flow_delay = 0
default_process_limit = 100
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_error_sleep_time = 0
smtpd_recipient_limit = 1000
queue_minfree = 0
message_size_limit = {max_size}
mailbox_size_limit = 0
virtual_mailbox_limit = 0
biff = no
smtputf8_enable = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root / 'maildir'}
virtual_mailbox_maps = texthash:{root / 'etc' / 'vmailbox'}
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
virtual_minimum_uid = 1
"""


class PostfixInstance:
    """``start()`` it, send mail to ``port``, count ``stored()``, ``stop()``."""

    def __init__(self, root: Path, port: int, domain: str = "smtpd.com", max_size: int = 20 * 1024 * 1024,
                 relayhost: str | None = None) -> None:
        self.root = root
        self.port = port
        self.etc = root / "etc"
        self.maildir = root / "maildir"
        closed = [p for p in root.resolve().parents if not os.stat(p).st_mode & 0o001]
        if closed:
            # Postfix's own user and the virtual agent's (nobody) must reach it.
            raise ValueError(f"{root}: {closed[0]} is closed to other users; pick a folder under /tmp")
        self.etc.mkdir(parents=True)
        (root / "queue").mkdir()
        (root / "data").mkdir()
        # The virtual agent runs as nobody: it must reach and write the base.
        os.chmod(root, 0o755)
        self.maildir.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(self.maildir, nobody.pw_uid, nobody.pw_gid)
        postfix = pwd.getpwnam("postfix")
        os.chown(root / "data", postfix.pw_uid, grp.getgrnam("postfix").gr_gid)
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{port}"))
        # One Maildir per local part, as prefork-smtpd's folders. The virtual
        # agent allows no regexp substitution, so the local parts the load
        # generators use are listed: b, and 0b..100b (smtp-source -r).
        parts = ["b", "big"] + [f"{i}b" for i in range(101)]
        (self.etc / "vmailbox").write_text("".join(f"{p}@{domain} {p}/\n" for p in parts))
        main = self.etc / "main.cf"
        main.write_text(main_cf(root, domain, max_size, relayhost))
        # Postfix waits until main.cf is a second old before it trusts it.
        old = time.time() - 10
        for f in self.etc.iterdir():
            os.utime(f, (old, old))

    @staticmethod
    def program() -> str:
        return POSTFIX

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "MAIL_CONFIG": str(self.etc)}
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], env=env, capture_output=True, text=True,
                              timeout=60)

    def start(self) -> None:
        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}{self.log()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        self._postfix("stop")
        if pid:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)

    def stored(self) -> int:
        """Mails in every Maildir's new/ (one file per recipient folder)."""
        total = 0
        try:
            folders = list(os.scandir(self.maildir))
        except OSError:
            return 0
        for folder in folders:
            try:
                total += len(os.listdir(os.path.join(folder.path, "new")))
            except OSError:
                pass
        return total

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text()[-2000:]
        except OSError:
            return ""
