"""Side-by-side benchmark: prefork-smtpd against Postfix, aiosmtpd and smtp-sink.

    bench/run [--rounds 3] [--quick] [--scale F] [--only S1,S2,...] [--servers w2,postfix,...]

Every server is started fresh on 127.0.0.1 for each measurement, and the
servers take turns (A B C A B C ...) inside one invocation, so the drift of
a shared machine hits them all alike. `sync` runs before every measured run,
so no contender pays for another's dirty pages. The median of the rounds is
quoted with the lowest and highest round beside it.

  S1  5,000 mails of 1 KiB, 50 parallel sessions, a new connection per mail
  S2  the same with connections kept (-d)
  S3  200 mails of 1 MiB, 10 parallel sessions
  S8  fan-out: 1,000 mails each to 20 recipients, 50 kept sessions
  S9  S2 while another process rewrites a 50 MiB file in a loop on the same
      file system (no fsync), started before the run
  T1  2,000 mails of 1 KiB, 50 sessions, a new connection and STARTTLS per mail
  T2  5,000 mails of 1 KiB, 50 kept TLS sessions
  R1  relay: 2,000 mails of 1 KiB, 50 kept sessions, to a domain the server
      does not serve; relayed to one next hop (a prefork-smtpd receiver, the
      same for every contender) and done when on the receiver's disk
  S4  idle capacity: 20,000 sessions open, greeting p50/p99, worker memory
  S5  no stall: 8 clients upload 50 MiB each while a 9th times NOOPs
  S6  balance: sessions per worker under S2 (max/min)

Contenders: prefork-smtpd at --workers 1, 2 and 4 (defaults: logging on,
every mail fsynced before `250`); Postfix (a throwaway instance, see
postfix.py: queue file fsynced before `250`, then the virtual agent into
Maildir), timed twice: until the last `250` (acknowledged) and until every
mail is in its Maildir; aiosmtpd 1.4.6 with its Mailbox handler (stores into
a Maildir, never fsyncs) and its Sink handler (discards); Postfix's
smtp-sink (C, discards). For T1/T2: prefork-smtpd with a certificate and
--require-tls, aiosmtpd's own STARTTLS (tls_context, require_starttls) with
the Mailbox handler.

Load comes from Postfix's smtp-source (S1-S3, S8, S9), from tls_load.py
(T1, T2: smtp-source has no TLS) and from small asyncio clients of this
script (S4, S5). CPU per mail is user and system time of the server's
process tree only (psutil, reaped children included), from just before the
load until every mail is stored. For servers that store, every mail sent
must be on disk afterwards, or the run fails. Results go to bench/RESULTS.md
(and bench/throughput.png where matplotlib is present).

Postfix needs root (it starts as root and drops to its own user); without
root it is left out, and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from postfix import PostfixInstance  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
# This interpreter's prefork-smtpd: the one bench/run installed beside it.
PREFORK = [sys.executable, "-m", "prefork_smtpd"]
MiB = 1024 * 1024
CAN_RUN_POSTFIX = os.geteuid() == 0 and os.path.exists(PostfixInstance.program())
# Where every contender's files go (set by use_work_folder; the same file
# system for all of them).
WORK_ROOT = "/var/tmp"


def use_work_folder(parent: str) -> Path:
    """Make the folder every run's files go in, below ``parent``; removed at the end.

    Not /tmp by default: on ext4 without a journal, creating a file skips,
    one by one, the inodes of its directory's block group freed in the last
    30 s or more (find_inode_bit -> recently_deleted). Where other programs
    churn temporary files, or right after the previous contender's 5,000
    mails were deleted, a create measured 210-260 us of CPU instead of
    30-40 us: that is the neighbours' cost, not the server's.
    """
    global WORK_ROOT
    Path(parent).mkdir(parents=True, exist_ok=True)
    WORK_ROOT = tempfile.mkdtemp(prefix="prefork-smtpd-bench-", dir=parent)
    os.chmod(WORK_ROOT, 0o755)  # Postfix's own users reach their folders below
    spread_subfolders(WORK_ROOT)
    return Path(WORK_ROOT)


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subfolders(path: str) -> None:
    """``chattr +T``: each run's folder goes to a block group of its own.

    ext2/3/4 put a new folder near its parent, unless the parent is marked
    a top of hierarchies; then the folder goes to a group with inodes to
    spare, away from where others just deleted files (see use_work_folder).
    Elsewhere (another file system, no such flag) nothing changes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags[:4], sys.byteorder) | FS_TOPDIR_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, value.to_bytes(4, sys.byteorder) + bytes(4))
    except OSError:
        pass
    finally:
        os.close(fd)


def retire(folder: Path) -> None:
    """Give a finished run's disk space back without freeing its inodes yet.

    Deleting thousands of files right before the next contender's run would
    make each of its creates walk past them (see use_work_folder); emptying
    the large files frees the space, and the inodes go when the bench ends.
    """
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            try:
                if os.lstat(path).st_size > 64 * 1024:
                    os.truncate(path, 0)
            except OSError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ servers
@dataclass
class ServerKind:
    name: str
    stores: bool
    workers: int = 0  # prefork-smtpd only
    tls: bool = False  # T1/T2: STARTTLS offered and required
    extra: tuple[str, ...] = ()  # more prefork-smtpd flags (the relay scenario's receiver)

    @property
    def postfix(self) -> bool:
        return self.name == "Postfix"

    def command(self, port: int, root: Path, max_size: int, tls: "Certificate | None",
                relay_to: int | None = None) -> list[str]:
        if self.name.startswith("prefork-smtpd"):
            cmd = PREFORK + [
                "--workers", str(self.workers), "-l", "127.0.0.1", "-P", str(port),
                "-c", str(free_port()), "--mail-dir", str(root / "mail_dir"), "--log-file", str(root / "log.txt"),
                "--max-message-size", str(max_size), *self.extra,
            ]
            if self.tls:
                cmd += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--require-tls"]
            if relay_to:
                cmd += ["--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{relay_to}"]
            return cmd
        if self.name == "aiosmtpd-Mailbox TLS":
            return [sys.executable, str(HERE / "aiosmtpd_tls.py"), str(port), str(tls.cert), str(tls.key),
                    str(root / "maildir")]
        if self.name == "aiosmtpd-Mailbox":
            return [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                    "-c", "aiosmtpd.handlers.Mailbox", str(root / "maildir")]
        if self.name == "aiosmtpd-Sink":
            return [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"]
        if self.name == "smtp-sink":
            return [SMTP_SINK, "-u", "nobody", "-m", "1000", f"127.0.0.1:{port}", "1024"]
        raise ValueError(self.name)

    def copies(self, recipients: int) -> int:
        """Files one mail leaves: one per recipient folder, except aiosmtpd's
        Mailbox, which stores a message once whatever its recipients."""
        return 1 if self.name.startswith("aiosmtpd") else recipients


JOURNAL = ("--journal-size", str(16 << 20))  # the journal on (README, "The mail store"): one flush per batch
PREFORK_KINDS = [ServerKind(f"prefork-smtpd -w{n}", True, n) for n in (1, 2, 4)] + [
    ServerKind("prefork-smtpd -w2 journal", True, 2, extra=JOURNAL)]
POSTFIX_KIND = ServerKind("Postfix", True)
REFERENCES = [ServerKind("aiosmtpd-Mailbox", True), ServerKind("aiosmtpd-Sink", False), ServerKind("smtp-sink", False)]
# R1's next hop, the same for every contender: prefork-smtpd serving the
# outside domain, every mail fsynced into its Maildir before its 250. It
# serves the senders' domain too: prefork-smtpd takes mail only from senders
# of the domains it serves.
RELAY_DOMAIN = "relay.example"
RECEIVER_KIND = ServerKind("prefork-smtpd -w2", True, 2, extra=("--domain", RELAY_DOMAIN, "--domain", "smtpd.com"))
TLS_KINDS = [ServerKind(f"prefork-smtpd -w{n} TLS", True, n, tls=True) for n in (1, 2)] + [
    ServerKind("aiosmtpd-Mailbox TLS", True, tls=True)]


@dataclass
class Certificate:
    """A throwaway CA and a server certificate for localhost (trustme)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def make(cls, folder: Path) -> "Certificate":
        import trustme

        ca = trustme.CA()
        issued = ca.issue_cert("localhost", "127.0.0.1")
        made = cls(folder / "cert.pem", folder / "key.pem", folder / "ca.pem")
        issued.cert_chain_pems[0].write_to_path(str(made.cert))
        for extra in issued.cert_chain_pems[1:]:
            extra.write_to_path(str(made.cert), append=True)
        issued.private_key_pem.write_to_path(str(made.key))
        ca.cert_pem.write_to_path(str(made.ca))
        return made


def tree_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` and its descendants so far,
    those already reaped included (a parent's children_* times)."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    user = system = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        user += t.user + t.children_user
        system += t.system + t.children_system
    return user, system


class RunningServer:
    def __init__(self, kind: ServerKind, max_size: int = 10 * MiB, tls: Certificate | None = None,
                 relay_to: int | None = None) -> None:
        """``relay_to``: a port on 127.0.0.1 where mail for other domains goes (R1)."""
        self.kind = kind
        self.root = Path(tempfile.mkdtemp(prefix="bench-", dir=WORK_ROOT))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.postfix: PostfixInstance | None = None
        if kind.postfix:
            self.postfix = PostfixInstance(self.root, self.port, max_size=max_size + MiB,
                                           relayhost=f"127.0.0.1:{relay_to}" if relay_to else None)
            self.postfix.start()
        else:
            if kind.name.startswith("aiosmtpd-Mailbox"):
                import mailbox

                mailbox.Maildir(str(self.root / "maildir"), create=True)  # tmp/, new/, cur/
            self.proc = subprocess.Popen(
                kind.command(self.port, self.root, max_size, tls, relay_to), cwd=self.root,
                stdout=subprocess.DEVNULL, stderr=open(self.root / "stderr.txt", "wb"),
            )
        self.wait_greeting()
        if kind.workers:
            self.wait_workers(kind.workers)

    @property
    def pid(self) -> int:
        return self.postfix.master_pid() if self.postfix else self.proc.pid

    def cpu(self) -> tuple[float, float]:
        return tree_cpu(self.pid)

    def stored(self) -> int:
        if self.postfix:
            return self.postfix.stored()
        if self.kind.name.startswith("prefork-smtpd"):
            return sum(len(os.listdir(p)) for p in (self.root / "mail_dir").glob("*/new"))
        if self.kind.name.startswith("aiosmtpd-Mailbox"):
            new = self.root / "maildir" / "new"
            return len(os.listdir(new)) if new.exists() else 0
        return 0

    def failure(self) -> str:
        if self.postfix:
            return self.postfix.log()
        try:
            return (self.root / "stderr.txt").read_text()[-2000:]
        except OSError:
            return ""

    def wait_greeting(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind.name} exited: {self.failure()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind.name} never greeted: {self.failure()}")

    def workers(self) -> list[psutil.Process]:
        return [c for c in psutil.Process(self.proc.pid).children() if "worker" in " ".join(c.cmdline())]

    def wait_workers(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            titles = [" ".join(w.cmdline()) for w in self.workers()]
            if sum("connections]" in t for t in titles) == n:
                return
            time.sleep(0.05)
        raise RuntimeError("workers did not start")

    def stop(self) -> None:
        if self.postfix:
            self.postfix.stop()
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        retire(self.root)


# -------------------------------------------------------------- scenarios
@dataclass
class Throughput:
    scenario: str
    sessions: int
    mails: int
    size: int
    keep: bool  # connections kept (smtp-source -d)
    recipients: int = 1
    writer: bool = False  # S9: a 50 MiB file rewritten in a loop beside the run
    tls: bool = False  # T1/T2: tls_load.py instead of smtp-source
    relay: bool = False  # R1: to an outside domain, relayed to a receiver; done when on its disk

    @property
    def recipient(self) -> str:
        return f"b@{RELAY_DOMAIN}" if self.relay else "b@smtpd.com"

    def describe(self) -> str:
        size = f"{self.size // MiB} MiB" if self.size >= MiB else f"{self.size // 1024} KiB"
        text = f"{self.mails:,} x {size}"
        if self.recipients > 1:
            text += f" x {self.recipients} rcpt"
        text += ", kept" if self.keep else ", new conn."
        if self.writer:
            text += ", + writer"
        if self.relay:
            text += ", relayed"
        return text


def scenarios(scale: float) -> dict[str, Throughput]:
    """The mail counts times ``scale`` (--quick: 0.1; --scale on a slow host)."""
    def n(mails: int) -> int:
        return max(int(mails * scale), 10)

    return {
        "S1": Throughput("S1", sessions=50, mails=n(5000), size=1024, keep=False),
        "S2": Throughput("S2", sessions=50, mails=n(5000), size=1024, keep=True),
        "S3": Throughput("S3", sessions=10, mails=n(200), size=MiB, keep=False),
        "S8": Throughput("S8", sessions=50, mails=n(1000), size=1024, keep=True, recipients=20),
        "S9": Throughput("S9", sessions=50, mails=n(5000), size=1024, keep=True, writer=True),
        "T1": Throughput("T1", sessions=50, mails=n(2000), size=1024, keep=False, tls=True),
        "T2": Throughput("T2", sessions=50, mails=n(5000), size=1024, keep=True, tls=True),
        "R1": Throughput("R1", sessions=50, mails=n(2000), size=1024, keep=True, relay=True),
    }


# The S9 neighbour: rewrites one 50 MiB file, 1 MiB at a time, never fsyncs,
# as a log, a backup or a build would; says how often it did on SIGTERM.
WRITER = r"""
import signal, sys
rounds = 0
def stop(*_):
    print(rounds, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
block = b"w" * (1 << 20)
print("ready", flush=True)
while True:
    with open(sys.argv[1], "wb") as f:
        for _ in range(50):
            f.write(block)
    rounds += 1
"""


class Writer:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-writer-", dir=WORK_ROOT))  # the servers' file system
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(self.folder / "big")],
                                     stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()
        self.started = time.monotonic()

    def stop(self) -> float:
        """Stop it; MiB/s it wrote."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        elapsed = time.monotonic() - self.started
        retire(self.folder)
        return 50 * int(out.strip() or 0) / elapsed


@dataclass
class Measurement:
    acked: float  # mails/s until the last 250
    stored: float  # mails/s until every mail is in its Maildir (= acked for servers that store before 250)
    user_us: float  # server CPU per mail, microseconds
    system_us: float
    client_cpu: float | None = None  # T1/T2: the load generators' busiest process, share of one core
    writer_mib_s: float | None = None  # S9
    tls_versions: list[str] = field(default_factory=list)  # T1/T2


def run_smtp_source(server: RunningServer, sc: Throughput) -> float:
    cmd = [SMTP_SOURCE, "-s", str(sc.sessions), "-m", str(sc.mails), "-l", str(sc.size),
           "-f", "a@smtpd.com", "-t", sc.recipient, "-M", "client.example"]
    if sc.recipients > 1:
        cmd += ["-r", str(sc.recipients)]
    if sc.keep:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{server.port}")
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed on {server.kind.name}: {result.stderr.decode()[-500:]}")
    return start


def run_tls_load(server: RunningServer, sc: Throughput, tls: Certificate,
                 procs: int = 2) -> tuple[float, float, list[str]]:
    """T1/T2 through ``procs`` tls_load.py processes; returns the start, the
    busiest client's CPU share of one core and the TLS versions negotiated."""
    clients = []
    for i in range(procs):
        mails = sc.mails // procs + (1 if i < sc.mails % procs else 0)
        clients.append(subprocess.Popen(
            [sys.executable, str(HERE / "tls_load.py"), str(server.port), str(tls.ca), str(mails),
             str(sc.sessions // procs), str(sc.size), "keep" if sc.keep else "new"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    time.sleep(0.5)  # imports done
    for c in clients:
        c.stdin.write("\n")
        c.stdin.flush()
    reports = []
    for c in clients:
        out, err = c.communicate(timeout=900)
        if c.returncode != 0:
            raise RuntimeError(f"tls_load failed on {server.kind.name}: {err[-800:]}")
        reports.append(json.loads(out))
    if sum(r["sent"] for r in reports) != sc.mails:
        raise RuntimeError(f"tls_load sent {sum(r['sent'] for r in reports)} of {sc.mails}")
    start = min(r["start"] for r in reports)
    busiest = max((r["user"] + r["system"]) / (r["end"] - r["start"]) for r in reports)
    return start, busiest, sorted({v for r in reports for v in r["tls"]})


def measure(server: RunningServer, sc: Throughput, tls: Certificate | None,
            receiver: RunningServer | None = None) -> Measurement:
    """``receiver``: R1's next hop; a mail counts as stored once it is on the receiver's disk."""
    writer = Writer() if sc.writer else None
    try:
        os.sync()  # nobody's dirty pages but the writer's are left for this run to flush
        cpu_before = server.cpu()
        client_cpu, versions = None, []
        if sc.tls:
            start, client_cpu, versions = run_tls_load(server, sc, tls)
        else:
            start = run_smtp_source(server, sc)
        acked = time.monotonic() - start
        expected = sc.mails * server.kind.copies(sc.recipients)
        store = receiver or server  # where a mail is done
        if server.kind.stores:
            # Postfix delivers after its 250; aiosmtpd may still be writing;
            # a relaying server sends on after its 250.
            deadline = time.monotonic() + 600
            while store.stored() < expected and time.monotonic() < deadline:
                time.sleep(0.02)
            stored = store.stored()
            if stored != expected:
                raise RuntimeError(f"{server.kind.name} stored {stored} of {expected} in {sc.scenario}: "
                                   f"{server.failure()} {store.failure() if receiver else ''}")
        in_maildir = time.monotonic() - start
        cpu_after = server.cpu()
    finally:
        writer_rate = writer.stop() if writer else None
    return Measurement(
        acked=sc.mails / acked,
        stored=sc.mails / (in_maildir if server.kind.postfix or receiver else acked),
        user_us=1e6 * (cpu_after[0] - cpu_before[0]) / sc.mails,
        system_us=1e6 * (cpu_after[1] - cpu_before[1]) / sc.mails,
        client_cpu=client_cpu, writer_mib_s=writer_rate, tls_versions=versions,
    )


def sessions_per_worker(server: RunningServer) -> list[int]:
    counts: dict[str, int] = {}
    for line in (server.root / "log.txt").read_text().splitlines():
        m = re.search(r": (worker \d+): \S+ connected$", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return sorted(counts.values())


# S4 ---------------------------------------------------------------------
IDLE_CLIENT = r"""
import asyncio, json, sys, time
import uvloop
port, count = int(sys.argv[1]), int(sys.argv[2])
async def one(sem, delays, held):
    async with sem:
        start = time.perf_counter()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
            line = await asyncio.wait_for(r.readline(), 60)
        except Exception:
            return
        if line.startswith(b"220"):
            delays.append(time.perf_counter() - start)
            held.append(w)
async def main():
    # At most 100 connects in flight, so the figure is the server's greeting
    # delay and not this client's own queue.
    sem, delays, held = asyncio.Semaphore(100), [], []
    await asyncio.gather(*(one(sem, delays, held) for _ in range(count)))
    print(json.dumps(delays), flush=True)
    sys.stdin.readline()   # hold every session until told to let go
uvloop.run(main())
"""


def idle_capacity(total: int) -> dict:
    server = RunningServer(ServerKind("prefork-smtpd -w4", True, 4))
    try:
        before = sum(w.memory_info().rss for w in server.workers())
        per_client = total // 2  # two client processes: each stays under the fd limit
        clients = [
            subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, str(server.port), str(per_client)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        delays = []
        for c in clients:
            delays += json.loads(c.stdout.readline())
        time.sleep(1.5)  # let the workers' housekeeping tick account for every session
        after = sum(w.memory_info().rss for w in server.workers())
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"XSTAT CURRENT\r\n")
            current = int(f.readline().decode().rsplit(":", 1)[1])
        for c in clients:
            c.stdin.write("\n")
            c.stdin.flush()
            c.wait(timeout=120)
        delays.sort()
        return {
            "asked": total, "greeted": len(delays), "xstat_current": current,
            "p50_ms": 1000 * delays[len(delays) // 2], "p99_ms": 1000 * delays[int(len(delays) * 0.99) - 1],
            "kib_per_session": (after - before) / 1024 / max(len(delays), 1),
        }
    finally:
        server.stop()


# S5 ---------------------------------------------------------------------
async def upload(port: int, size: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    w.write(b"EHLO up\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<big@smtpd.com>\r\nDATA\r\n")
    await w.drain()
    while True:  # read the EHLO lines, MAIL, RCPT and 354
        line = await r.readline()
        if line.startswith(b"354"):
            break
        if not line or line[:1] in (b"4", b"5"):
            raise RuntimeError(f"upload refused: {line!r}")
    block = (b"z" * 998 + b"\r\n") * 1024  # 1 MB of lines
    for _ in range(size // len(block)):
        w.write(block)
        await w.drain()
    w.write(b".\r\n")
    await w.drain()
    reply = await r.readline()
    if not reply.startswith(b"250"):
        raise RuntimeError(f"upload not accepted: {reply!r}")
    w.write(b"QUIT\r\n")
    w.close()


async def uploads(port: int, count: int, size: int) -> None:
    await asyncio.gather(*[upload(port, size) for _ in range(count)])


async def noops_until_told(port: int) -> list[float]:
    """NOOP round trips, one every 10 ms, until SIGUSR1; says "ready" once connected."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, done.set)
    print("ready", flush=True)
    samples = []
    while not done.is_set():
        start = time.perf_counter()
        w.write(b"NOOP\r\n")
        await w.drain()
        await r.readline()
        samples.append(time.perf_counter() - start)
        await asyncio.sleep(0.01)
    w.close()
    return samples


def no_stall(kind: ServerKind, count: int, size: int) -> dict:
    server = RunningServer(kind, max_size=size + 10 * MiB)
    # The probe and the uploads run in two processes of their own: sharing
    # one event loop, the probe's reply would wait behind the uploads' own
    # writes, and the figure would be the client's, not the server's.
    probe_code = ("import asyncio, json, sys; sys.path.insert(0, %r); import run; "
                  "print(json.dumps(asyncio.run(run.noops_until_told(%d))))") % (str(HERE), server.port)
    upload_code = ("import asyncio, sys; sys.path.insert(0, %r); import run; "
                   "asyncio.run(run.uploads(%d, %d, %d))") % (str(HERE), server.port, count, size)
    probe = subprocess.Popen([sys.executable, "-c", probe_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        if probe.stdout.readline().strip() != "ready":
            raise RuntimeError(f"NOOP probe failed: {probe.stderr.read()[-800:]}")
        up = subprocess.run([sys.executable, "-c", upload_code], capture_output=True, text=True, timeout=1800)
        probe.send_signal(signal.SIGUSR1)
        out, err = probe.communicate(timeout=60)
        if up.returncode != 0:
            raise RuntimeError(up.stderr[-800:])
        if probe.returncode != 0:
            raise RuntimeError(err[-800:])
        samples = sorted(json.loads(out))
        if kind.stores and server.stored() != count:
            raise RuntimeError("not every upload was stored")
        return {
            "server": kind.name, "noops": len(samples),
            "p50_ms": 1000 * samples[len(samples) // 2], "p99_ms": 1000 * samples[int(len(samples) * 0.99) - 1],
            "max_ms": 1000 * samples[-1],
        }
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
        server.stop()


# ---------------------------------------------------------------- report
@dataclass
class Results:
    runs: dict[str, dict[str, list[Measurement]]] = field(default_factory=dict)  # scenario -> server -> rounds
    balance: list[list[int]] = field(default_factory=list)
    idle: dict | None = None
    stall: list[dict] = field(default_factory=list)

    def add(self, scenario: str, server: str, m: Measurement) -> None:
        self.runs.setdefault(scenario, {}).setdefault(server, []).append(m)

    def values(self, scenario: str, server: str, what: str = "acked") -> list[float]:
        return [getattr(m, what) for m in self.runs.get(scenario, {}).get(server, [])]

    def median(self, scenario: str, server: str, what: str = "acked") -> float | None:
        values = self.values(scenario, server, what)
        return statistics.median(values) if values else None


def versions() -> str:
    import uvloop

    try:
        import aiosmtpd

        aio = aiosmtpd.__version__
    except ImportError:
        aio = "absent"
    import prefork_smtpd

    try:
        postfix = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True).stdout
    except OSError:
        postfix = ""
    postfix = postfix.strip()
    return (
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, "
        f"Linux {platform.release()}; Python {platform.python_version()}, uvloop {uvloop.__version__}, "
        f"aiosmtpd {aio}, Postfix {postfix or 'absent'}, prefork-smtpd {prefork_smtpd.__version__}"
    )


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """The median, and the lowest and highest round when there are several."""
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
    return text


# A report row: its label, the server's name in Results, the figure.
Row = tuple[str, str, str]


def rate_rows(kinds: list[ServerKind]) -> list[Row]:
    rows: list[Row] = []
    for k in kinds:
        if k.postfix:
            rows += [("Postfix, acknowledged", k.name, "acked"), ("Postfix, all in Maildir", k.name, "stored")]
        else:
            rows.append((k.name, k.name, "acked"))
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(results: Results, kinds: list[ServerKind], tls_kinds: list[ServerKind], sc: dict[str, Throughput],
                 args: argparse.Namespace, elapsed: float) -> str:
    plain = [s for s in results.runs if not sc[s].tls and not sc[s].relay]
    relayed = [s for s in results.runs if sc[s].relay]
    tls = [s for s in results.runs if sc[s].tls]
    lines = [
        "# Benchmark results",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {versions()}",
        f"- command: `bench/run {' '.join(sys.argv[1:])}`".replace(" `", " `").rstrip(),
        f"- rounds: {args.rounds} (servers in turn, A B C A B C ...; `sync` before each run); run time"
        f" {elapsed / 60:.1f} min",
        "- prefork-smtpd runs with its defaults: logging on, every mail fsynced into Maildir before `250`.",
    ]
    if not CAN_RUN_POSTFIX:
        lines.append("- Postfix left out: it needs root and /usr/sbin/postfix.")
    lines += [
        "",
        SCENARIO_NOTES.strip(),
    ]
    if plain:
        lines += ["", "## Throughput (mails/s)", ""]
        lines += table(["server"] + [f"{s} ({sc[s].describe()})" for s in plain],
                       [[label] + [spread(results.values(s, name, what)) for s in plain]
                        for label, name, what in rate_rows(kinds)])
    if tls:
        negotiated = sorted({v for s in tls for ms in results.runs[s].values() for m in ms for v in m.tls_versions})
        lines += ["", f"## TLS (mails/s; STARTTLS required; negotiated: {', '.join(negotiated)})", ""]
        lines += table(["server"] + [f"{s} ({sc[s].describe()})" for s in tls]
                       + [f"{s}: busiest client process, CPU share of a core" for s in tls],
                       [[k.name] + [spread(results.values(s, k.name)) for s in tls]
                        + [spread([100 * v for v in results.values(s, k.name, "client_cpu")], "{:.0f}%") for s in tls]
                        for k in tls_kinds])
    references = [r for r in rate_rows(kinds) if not r[1].startswith("prefork") and r[1] != "aiosmtpd-Sink"]
    prefork = [k for k in kinds if k.workers]
    if plain and prefork and references:
        lines += ["", "## Ratios of prefork-smtpd (medians)", ""]
        rows = []
        for k in prefork:
            for label, name, what in references:
                cells = []
                for s in plain:
                    m, r = results.median(s, k.name), results.median(s, name, what)
                    cells.append(f"{m / r:.2f}x" if m and r else "-")
                rows.append([f"{k.name.replace('prefork-smtpd ', '')} / {label}"] + cells)
        lines += table(["prefork-smtpd"] + plain, rows)
    if tls:
        ref = "aiosmtpd-Mailbox TLS"
        rows = []
        for k in tls_kinds:
            if k.workers:
                rows.append([f"{k.name} / {ref}"] + [
                    f"{results.median(s, k.name) / results.median(s, ref):.2f}x"
                    if results.median(s, k.name) and results.median(s, ref) else "-" for s in tls])
        if rows:
            lines += [""] + table(["TLS"] + tls, rows)
    w1, w2 = results.median("S2", "prefork-smtpd -w1"), results.median("S2", "prefork-smtpd -w2")
    if w1 and w2:
        lines += ["", f"`--workers 2` / `--workers 1` on S2: {w2 / w1:.2f}x"]
    if "S2" in results.runs and "S9" in results.runs:
        lines += ["", "## S9 against S2: what a busy neighbour costs (median S9 / median S2)", ""]
        rows = []
        for label, name, what in rate_rows(kinds):
            quiet, busy = results.median("S2", name, what), results.median("S9", name, what)
            rows.append([label, f"{busy / quiet:.0%}" if quiet and busy else "-"])
        writer = [m.writer_mib_s for ms in results.runs["S9"].values() for m in ms if m.writer_mib_s]
        lines += table(["server", "S9 / S2"], rows)
        if writer:
            lines += ["", f"The writer rewrote its file at {spread(writer)} MiB/s during the S9 runs."]
    for s in relayed:
        lines += ["", f"## {s}: relay (mails/s; {sc[s].describe()}; next hop: {RECEIVER_KIND.name}"
                  f" --domain {RELAY_DOMAIN}, fsync before 250)", ""]
        rows = []
        for k in relaying(kinds):
            if not results.values(s, k.name):
                continue
            rows.append([k.name, spread(results.values(s, k.name)), spread(results.values(s, k.name, "stored")),
                         f"{results.median(s, k.name, 'user_us'):,.0f} + {results.median(s, k.name, 'system_us'):,.0f}"])
        lines += table(["server", "acknowledged", "all on the next hop's disk",
                        "CPU per mail, relaying server only (us, user + system)"], rows)
        postfix = results.median(s, POSTFIX_KIND.name, "stored")
        if postfix:
            lines += [""] + table(["prefork-smtpd / Postfix (medians, on the next hop's disk)", s], [
                [k.name, f"{results.median(s, k.name, 'stored') / postfix:.2f}x"]
                for k in relaying(kinds) if k.workers and results.median(s, k.name, "stored")])
    if plain or tls:
        lines += ["", "## CPU per mail (server processes only; microseconds, user + system, medians)", ""]
        lines += cpu_table(results, kinds, tls_kinds, plain, tls)
    if results.balance:
        ratios = [max(b) / min(b) for b in results.balance if b and min(b) > 0]
        lines += ["", "## S6: balance (sessions per worker under S2, 4 workers)", ""]
        for b in results.balance:
            lines.append(f"- {b} -> max/min {max(b) / max(min(b), 1):.2f}")
        if ratios:
            lines.append(f"- median max/min: {statistics.median(ratios):.2f}")
    if results.idle:
        i = results.idle
        lines += [
            "", "## S4: idle capacity (prefork-smtpd, 4 workers)", "",
            f"- sessions asked {i['asked']:,}, greeted {i['greeted']:,}, XSTAT CURRENT {i['xstat_current']:,}",
            f"- greeting p50 {i['p50_ms']:.1f} ms, p99 {i['p99_ms']:.1f} ms",
            f"- worker memory growth: {i['kib_per_session']:.2f} KiB per open session",
        ]
    if results.stall:
        lines += ["", "## S5: NOOP round trip while 8 clients upload 50 MiB each", "",
                  "| server | NOOPs | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
        for s in results.stall:
            lines.append(f"| {s['server']} | {s['noops']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['max_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def cpu_table(results: Results, kinds: list[ServerKind], tls_kinds: list[ServerKind], plain: list[str],
              tls: list[str]) -> list[str]:
    rows = []
    for name, scenario_list in [(k.name, plain) for k in kinds] + [(k.name, tls) for k in tls_kinds]:
        if not scenario_list:
            continue
        row = [name]
        for s in plain + tls:
            if s not in scenario_list or not results.values(s, name, "user_us"):
                row.append("-")
                continue
            row.append(f"{results.median(s, name, 'user_us'):,.0f} + {results.median(s, name, 'system_us'):,.0f}")
        rows.append(row)
    return table(["server"] + plain + tls, rows)


SCENARIO_NOTES = """

What the columns mean:

- **Throughput**: mails/s for the whole run, from the first connection to the last `250` (smtp-source, or
  tls_load.py for T1/T2, reports the end). A cell is the median of the rounds, then (lowest-highest round).
- **Postfix, acknowledged**: Postfix until its last `250`: each queue file fsynced, nothing in a Maildir yet.
  **Postfix, all in Maildir**: the same run until every mail is in its Maildir's `new/` (its virtual agent
  fsyncs each file before it renames it there). prefork-smtpd's single figure is both: its `250` comes after
  the Maildir file and its directory entry are durable. **prefork-smtpd -w2 journal** (`--journal-size`): its
  `250` comes once the mail is durable in its journal, as Postfix's once its queue file is; the file is in
  `new/` at once, made durable later.
- **aiosmtpd-Mailbox** writes a Maildir without fsync; **aiosmtpd-Sink** and **smtp-sink** discard.
- **S8** counts mails, each to 20 recipients: 20 files per mail for prefork-smtpd and Postfix (one per
  recipient folder), one for aiosmtpd's Mailbox (it stores a message once).
- **S9** is S2 while another process rewrites a 50 MiB file in a loop (no fsync) on the same file system; the
  writer starts before the run and stops after the last mail is stored.
- **T1/T2**: STARTTLS required (prefork-smtpd `--require-tls`, aiosmtpd `require_starttls=True`), the
  certificate verified by the client. Load from two tls_load.py processes of 25 sessions each; the busiest
  one's CPU share of a core says whether the client could have been the limit (near 100% would be).
- **Ratios**: median of prefork-smtpd over median of the other contender, same scenario.
- **R1 (relay)**: smtp-source sends to `b@relay.example`, a domain the contender does not serve; it accepts
  from 127.0.0.0/8 and relays everything to one next hop on 127.0.0.1, a fresh prefork-smtpd serving that
  domain (and the senders', as it takes mail only from served domains; fsync before `250`), the same for every
  contender: prefork-smtpd with `--relay-networks 127.0.0.0/8
  --relay-host 127.0.0.1:PORT` (its queue fsynced before `250`, its queue runner sends on), Postfix with
  `relayhost = [127.0.0.1]:PORT`, `mynetworks = 127.0.0.0/8`, no DNS. A mail is done when it is in the
  receiver's Maildir; the clock stops at the last one. **acknowledged**: until the relaying server's last `250`.
  Both relaying servers share the 2 cores with the receiver.
- **CPU per mail**: user + system CPU seconds of the server's processes only (psutil over its process tree,
  reaped children included), from just before the load until every mail is stored, divided by the mails.
  For Postfix that is every process of the instance (smtpd, cleanup, qmgr, trivial-rewrite, virtual, ...)
  until the last mail is in its Maildir.
"""


def plot(results: Results, kinds: list[ServerKind], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenario_names = list(results.runs)
    if not scenario_names:
        return False
    fig, axes = plt.subplots(1, len(scenario_names), figsize=(4.5 * len(scenario_names), 4))
    if len(scenario_names) == 1:
        axes = [axes]
    for ax, scenario in zip(axes, scenario_names):
        rows = [(label, results.median(scenario, name, what)) for label, name, what in rate_rows(
            kinds + TLS_KINDS) if results.median(scenario, name, what)]
        ax.barh([r[0] for r in rows], [r[1] for r in rows],
                color=["#2a7" if r[0].startswith("prefork") else "#888" for r in rows])
        ax.set_title(f"{scenario}: mails/s")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def relaying(kinds: list[ServerKind]) -> list[ServerKind]:
    """The contenders of R1: those that can relay (prefork-smtpd, Postfix)."""
    return [k for k in kinds if k.workers or k.postfix]


def key(kind: ServerKind) -> str:
    """The short name --servers knows: w1, w2, w4, w2j, postfix, aiosmtpd-Mailbox, aiosmtpd-Sink, smtp-sink."""
    if kind.workers:
        return f"w{kind.workers}" + ("j" if kind.extra == JOURNAL else "")
    return kind.name.replace(" TLS", "").replace("Postfix", "postfix")


def main() -> int:
    p = argparse.ArgumentParser(description="prefork-smtpd side-by-side benchmark")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="S1,S2,S3,S8,S9,T1,T2,R1,S4,S5,S6", help="scenarios to run")
    p.add_argument("--servers", default="w1,w2,w4,w2j,postfix,aiosmtpd-Mailbox,aiosmtpd-Sink,smtp-sink",
                   help="contenders: w1, w2, w4 (prefork-smtpd --workers N), w2j (-w2 with the journal), postfix,"
                   " aiosmtpd-Mailbox,"
                   " aiosmtpd-Sink, smtp-sink")
    p.add_argument("--quick", action="store_true", help="a tenth of the mails, smaller S4/S5 (a short run)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply the mail counts of S1-S3, S8, S9, T1, T2, R1 (default 1; 0.1 with --quick)")
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    p.add_argument("--dir", default="/var/tmp",
                   help="where the runs' files go (every contender's, on one file system; default /var/tmp)")
    args = p.parse_args()
    work = use_work_folder(args.dir)
    try:
        return run_bench(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_bench(args: argparse.Namespace) -> int:
    wanted = set(args.only.split(","))
    servers = set(args.servers.split(","))
    sc = scenarios(args.scale if args.scale is not None else 0.1 if args.quick else 1.0)
    # A stopped run stops its servers too (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    kinds = [k for k in PREFORK_KINDS + ([POSTFIX_KIND] if CAN_RUN_POSTFIX else []) + REFERENCES if key(k) in servers]
    tls_kinds = [k for k in TLS_KINDS if key(k) in servers]
    if not CAN_RUN_POSTFIX and "postfix" in servers:
        print("Postfix left out: it needs root and /usr/sbin/postfix", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-cert-", dir=WORK_ROOT))
    cert = Certificate.make(folder) if wanted & {"T1", "T2"} else None
    results = Results()
    try:
        for round_no in range(1, args.rounds + 1):
            for scenario in [s for s in sc if s in wanted]:
                for kind in tls_kinds if sc[scenario].tls else relaying(kinds) if sc[scenario].relay else kinds:
                    # R1: a fresh receiver for each run, started before the relaying server.
                    receiver = RunningServer(RECEIVER_KIND) if sc[scenario].relay else None
                    try:
                        server = RunningServer(kind, tls=cert, relay_to=receiver.port if receiver else None)
                        try:
                            m = measure(server, sc[scenario], cert, receiver)
                            if scenario == "S2" and kind.workers == 4 and "S6" in wanted:
                                results.balance.append(sessions_per_worker(server))
                        finally:
                            server.stop()
                    finally:
                        if receiver:
                            receiver.stop()
                    results.add(scenario, kind.name, m)
                    extra = f", in Maildir {m.stored:6.0f}" if kind.postfix else ""
                    extra = f", on the next hop's disk {m.stored:6.0f}" if receiver else extra
                    extra += f", client CPU {m.client_cpu:.0%}, {'/'.join(m.tls_versions)}" if m.tls_versions else ""
                    print(f"round {round_no} {scenario} {kind.name:<22} {m.acked:8.0f} mails/s{extra},"
                          f" CPU/mail {m.user_us:.0f}+{m.system_us:.0f} us", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if "S4" in wanted:
        results.idle = idle_capacity(2000 if args.quick else 20000)
        print("S4", results.idle, flush=True)
    if "S5" in wanted:
        size = 5 * MiB if args.quick else 50 * MiB
        for kind in (ServerKind("prefork-smtpd -w4", True, 4), ServerKind("aiosmtpd-Mailbox", True)):
            results.stall.append(no_stall(kind, 8, size))
            print("S5", results.stall[-1], flush=True)
    report = write_report(results, kinds, tls_kinds, sc, args, time.monotonic() - started)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(report)
    picture = Path(args.output).with_name("throughput.png")
    if plot(results, kinds, picture):
        print(f"plot: {picture}")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
