"""Side-by-side benchmark: prefork-smtpd against aiosmtpd and Postfix's smtp-sink.

    bench/run [--rounds 3] [--quick] [--only S1,S2,...]

Every server is started fresh on 127.0.0.1 for each measurement, and the
servers take turns (A B C A B C ...) inside one invocation, so the drift of
a shared machine hits them all alike. The median of the rounds is quoted.

  S1  5,000 mails of 1 KiB, 50 parallel sessions, a new connection per mail
  S2  the same with connections kept (-d, 100 mails per connection)
  S3  200 mails of 1 MiB, 10 parallel sessions
  S4  idle capacity: 20,000 sessions open, greeting p50/p99, worker memory
  S5  no stall: 8 clients upload 50 MiB each while a 9th times NOOPs
  S6  balance: sessions per worker under S2 (max/min)

Load comes from Postfix's smtp-source (S1-S3) and from small asyncio
clients of this script (S4, S5). For servers that store, every mail sent
must be on disk afterwards, or the run fails. Results go to
bench/RESULTS.md (and bench/throughput.png where matplotlib is present).
"""

from __future__ import annotations

import argparse
import asyncio
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
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
PREFORK = shutil.which("prefork-smtpd") or "prefork-smtpd"
MiB = 1024 * 1024


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

    def command(self, port: int, root: Path, max_size: int) -> list[str]:
        if self.name.startswith("prefork-smtpd"):
            return [
                PREFORK, "--workers", str(self.workers), "-l", "127.0.0.1", "-P", str(port),
                "-c", str(free_port()), "--mail-dir", str(root / "mail_dir"), "--log-file", str(root / "log.txt"),
                "--max-message-size", str(max_size),
            ]
        if self.name == "aiosmtpd-Mailbox":
            return [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                    "-c", "aiosmtpd.handlers.Mailbox", str(root / "maildir")]
        if self.name == "aiosmtpd-Sink":
            return [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"]
        if self.name == "smtp-sink":
            return [SMTP_SINK, "-u", "nobody", "-m", "1000", f"127.0.0.1:{port}", "1024"]
        raise ValueError(self.name)

    def stored(self, root: Path) -> int:
        if self.name.startswith("prefork-smtpd"):
            return sum(len(os.listdir(p)) for p in (root / "mail_dir").glob("*/new"))
        if self.name == "aiosmtpd-Mailbox":
            new = root / "maildir" / "new"
            return len(os.listdir(new)) if new.exists() else 0
        return 0


PREFORK_KINDS = [ServerKind(f"prefork-smtpd -w{n}", True, n) for n in (1, 2, 4)]
REFERENCES = [ServerKind("aiosmtpd-Mailbox", True), ServerKind("aiosmtpd-Sink", False), ServerKind("smtp-sink", False)]


class RunningServer:
    def __init__(self, kind: ServerKind, max_size: int = 10 * MiB) -> None:
        self.kind = kind
        self.root = Path(tempfile.mkdtemp(prefix="bench-"))
        self.port = free_port()
        if kind.name == "aiosmtpd-Mailbox":
            import mailbox

            mailbox.Maildir(str(self.root / "maildir"), create=True)  # tmp/, new/, cur/
        self.proc = subprocess.Popen(
            kind.command(self.port, self.root, max_size), cwd=self.root,
            stdout=subprocess.DEVNULL, stderr=open(self.root / "stderr.txt", "wb"),
        )
        self.wait_greeting()
        if kind.workers:
            self.wait_workers(kind.workers)

    def wait_greeting(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind.name} exited: {(self.root / 'stderr.txt').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind.name} never greeted")

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
        # Every run starts on a clean file system: flushing is not left to the
        # next server (a journal commit or syncfs would pay for this one's
        # unsynced files and their removal).
        os.sync()


# -------------------------------------------------------------- scenarios
@dataclass
class Throughput:
    scenario: str
    sessions: int
    mails: int
    size: int
    keep: bool  # -d: connections kept


SCENARIOS = {
    "S1": Throughput("S1", sessions=50, mails=5000, size=1024, keep=False),
    "S2": Throughput("S2", sessions=50, mails=5000, size=1024, keep=True),
    "S3": Throughput("S3", sessions=10, mails=200, size=MiB, keep=False),
}


def run_smtp_source(server: RunningServer, sc: Throughput) -> float:
    cmd = [SMTP_SOURCE, "-s", str(sc.sessions), "-m", str(sc.mails), "-l", str(sc.size),
           "-f", "a@smtpd.com", "-t", "b@smtpd.com", "-M", "client.example"]
    if sc.keep:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{server.port}")
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, timeout=900)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed on {server.kind.name}: {result.stderr.decode()[-500:]}")
    if server.kind.stores:
        deadline = time.monotonic() + 10
        while server.kind.stored(server.root) < sc.mails and time.monotonic() < deadline:
            time.sleep(0.05)  # aiosmtpd may still be writing after its last 250
        stored = server.kind.stored(server.root)
        if stored != sc.mails:
            raise RuntimeError(f"{server.kind.name} stored {stored} of {sc.mails} mails in {sc.scenario}")
    return sc.mails / elapsed


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


async def noop_during_uploads(port: int, uploads: int, size: int) -> list[float]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    tasks = [asyncio.create_task(upload(port, size)) for _ in range(uploads)]
    samples = []
    while not all(t.done() for t in tasks):
        start = time.perf_counter()
        w.write(b"NOOP\r\n")
        await w.drain()
        await r.readline()
        samples.append(time.perf_counter() - start)
        await asyncio.sleep(0.01)
    for t in tasks:
        t.result()
    w.close()
    return samples


def no_stall(kind: ServerKind, uploads: int, size: int) -> dict:
    server = RunningServer(kind, max_size=size + 10 * MiB)
    try:
        # The probe runs in a child process, so the uploads' Python work in
        # this process cannot slow the probe itself.
        code = (
            "import asyncio, json, sys; sys.path.insert(0, %r); import run; "
            "print(json.dumps(asyncio.run(run.noop_during_uploads(%d, %d, %d))))"
        ) % (str(HERE), server.port, uploads, size)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-800:])
        samples = sorted(json.loads(out.stdout))
        if kind.stores and kind.stored(server.root) != uploads:
            raise RuntimeError("not every upload was stored")
        return {
            "server": kind.name, "noops": len(samples),
            "p50_ms": 1000 * samples[len(samples) // 2], "p99_ms": 1000 * samples[int(len(samples) * 0.99) - 1],
            "max_ms": 1000 * samples[-1],
        }
    finally:
        server.stop()


# ---------------------------------------------------------------- report
@dataclass
class Results:
    rates: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # scenario -> server -> [mails/s]
    balance: list[list[int]] = field(default_factory=list)
    idle: dict | None = None
    stall: list[dict] = field(default_factory=list)

    def add(self, scenario: str, server: str, rate: float) -> None:
        self.rates.setdefault(scenario, {}).setdefault(server, []).append(rate)

    def median(self, scenario: str, server: str) -> float | None:
        values = self.rates.get(scenario, {}).get(server)
        return statistics.median(values) if values else None


def versions() -> str:
    import uvloop

    try:
        import aiosmtpd

        aio = aiosmtpd.__version__
    except ImportError:
        aio = "absent"
    import prefork_smtpd

    return (
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, "
        f"Linux {platform.release()}; Python {platform.python_version()}, uvloop {uvloop.__version__}, "
        f"aiosmtpd {aio}, prefork-smtpd {prefork_smtpd.__version__}"
    )


def write_report(results: Results, kinds: list[ServerKind], args: argparse.Namespace, elapsed: float) -> str:
    names = [k.name for k in kinds]
    lines = [
        "# Benchmark results",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {versions()}",
        f"- command: `bench/run {' '.join(sys.argv[1:])}`".replace(" `", " `").rstrip(),
        f"- rounds: {args.rounds} (servers in turn, A B C A B C ...; median quoted); run time {elapsed / 60:.1f} min",
        "- prefork-smtpd runs with its defaults: logging on, every mail fsynced into Maildir before `250`.",
        "",
        "## Throughput (mails/s, median)",
        "",
        "| server | " + " | ".join(
            f"{s} ({SCENARIOS[s].mails} x {SCENARIOS[s].size // 1024} KiB{', -d' if SCENARIOS[s].keep else ''})"
            for s in results.rates
        ) + " |",
        "|---|" + "---|" * len(results.rates),
    ]
    for name in names:
        row = [name]
        for scenario in results.rates:
            m = results.median(scenario, name)
            row.append("-" if m is None else f"{m:,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Ratios of prefork-smtpd", ""]
    lines.append("| prefork-smtpd | " + " | ".join(
        f"{s} / aiosmtpd-Mailbox | {s} / smtp-sink" for s in results.rates) + " |")
    lines.append("|---|" + "---|---|" * len(results.rates))
    for name in names:
        if not name.startswith("prefork"):
            continue
        row = [name.replace("prefork-smtpd ", "")]
        for scenario in results.rates:
            m = results.median(scenario, name)
            for ref in ("aiosmtpd-Mailbox", "smtp-sink"):
                r = results.median(scenario, ref)
                row.append("-" if not (m and r) else (f"{m / r:.2f}x" if ref.startswith("aio") else f"{m / r:.0%}"))
        lines.append("| " + " | ".join(row) + " |")
    w1, w2 = results.median("S2", "prefork-smtpd -w1"), results.median("S2", "prefork-smtpd -w2")
    if w1 and w2:
        lines += ["", f"`--workers 2` / `--workers 1` on S2: {w2 / w1:.2f}x"]
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


def plot(results: Results, kinds: list[ServerKind]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = list(results.rates)
    if not scenarios:
        return False
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4))
    if len(scenarios) == 1:
        axes = [axes]
    for ax, scenario in zip(axes, scenarios):
        names = [k.name for k in kinds if results.median(scenario, k.name)]
        values = [results.median(scenario, n) for n in names]
        ax.barh(names, values, color=["#2a7" if n.startswith("prefork") else "#888" for n in names])
        ax.set_title(f"{scenario}: mails/s")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(HERE / "throughput.png", dpi=90)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description="prefork-smtpd side-by-side benchmark")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="S1,S2,S3,S4,S5,S6", help="scenarios to run")
    p.add_argument("--quick", action="store_true", help="smaller S4/S5 (for a smoke run)")
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = p.parse_args()
    wanted = set(args.only.split(","))
    started = time.monotonic()
    kinds = PREFORK_KINDS + REFERENCES
    results = Results()
    for round_no in range(1, args.rounds + 1):
        for scenario in [s for s in ("S1", "S2", "S3") if s in wanted]:
            for kind in kinds:
                server = RunningServer(kind)
                try:
                    rate = run_smtp_source(server, SCENARIOS[scenario])
                    if scenario == "S2" and kind.workers == 4 and "S6" in wanted:
                        results.balance.append(sessions_per_worker(server))
                finally:
                    server.stop()
                results.add(scenario, kind.name, rate)
                print(f"round {round_no} {scenario} {kind.name:<20} {rate:8.0f} mails/s", flush=True)
    if "S4" in wanted:
        results.idle = idle_capacity(2000 if args.quick else 20000)
        print("S4", results.idle, flush=True)
    if "S5" in wanted:
        size = 5 * MiB if args.quick else 50 * MiB
        for kind in (ServerKind("prefork-smtpd -w4", True, 4), ServerKind("aiosmtpd-Mailbox", True)):
            results.stall.append(no_stall(kind, 8, size))
            print("S5", results.stall[-1], flush=True)
    report = write_report(results, kinds, args, time.monotonic() - started)
    Path(args.output).write_text(report)
    if plot(results, kinds):
        print(f"plot: {HERE / 'throughput.png'}")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
