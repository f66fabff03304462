"""CPU per mail on S2, paired against another tree (not part of CI).

    python bench/cpu_per_mail.py [--mails 3000] [--rounds 8] [--baseline DIR]

S2: smtp-source, 50 kept sessions, 1 KiB mails, against ``--workers 2``.
CPU is user + system of the server's process tree (as bench/run counts it),
from just before the load until every mail is in its Maildir, divided by
the mails. With ``--baseline DIR`` (a folder holding another
``prefork_smtpd`` package, e.g. from ``git archive main prefork_smtpd``),
that tree and this one take turns, A B B A ..., so both share the noise of a
busy machine; CPU time swings far less than throughput, but on a shared
host only differences larger than the spread printed mean anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402


def wait_stored(server: "bench.RunningServer", count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.stored() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.stored()} of {count} mails stored")
        time.sleep(0.05)


def one_run(pythonpath: str | None, mails: int) -> tuple[float, float, float]:
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    else:
        os.environ.pop("PYTHONPATH", None)
    server = bench.RunningServer(bench.PREFORK_KINDS[1])  # --workers 2
    source = [bench.SMTP_SOURCE, "-l", "1024", "-f", "a@smtpd.com", "-t", "b@smtpd.com", "-M", "client.example", "-d"]
    try:
        warm = 200  # folders made, code paths run once
        subprocess.run(source + ["-s", "10", "-m", str(warm), f"127.0.0.1:{server.port}"], check=True, capture_output=True)
        wait_stored(server, warm, 60)
        subprocess.run(["sync"], check=True)
        user0, system0 = server.cpu()
        start = time.monotonic()
        subprocess.run(source + ["-s", "50", "-m", str(mails), f"127.0.0.1:{server.port}"], check=True, capture_output=True)
        elapsed = time.monotonic() - start
        wait_stored(server, warm + mails, 120)
        user1, system1 = server.cpu()
        return (user1 - user0) / mails * 1e6, (system1 - system0) / mails * 1e6, mails / elapsed
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--baseline", help="a folder with another prefork_smtpd package to compare with")
    parser.add_argument("--dir", default="/var/tmp", help="where the runs' files go (see bench/run.py --dir)")
    args = parser.parse_args()
    work = bench.use_work_folder(args.dir)
    try:
        compare(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace) -> None:
    trees = {"this tree": None}
    if args.baseline:
        trees = {"baseline": os.path.abspath(args.baseline), "this tree": None}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for name, path in order:
            user, system, rate = one_run(path, args.mails)
            results[name].append((user, system, rate))
            print(f"round {r} {name}: {user:.0f} + {system:.0f} us per mail, {rate:.0f} mails/s", flush=True)
    for name, runs in results.items():
        totals = [u + s for u, s, _ in runs]
        print(
            f"{name}: median {statistics.median(u for u, _, _ in runs):.0f} + "
            f"{statistics.median(s for _, s, _ in runs):.0f} us per mail (user + system; total "
            f"{statistics.median(totals):.0f}, {min(totals):.0f}-{max(totals):.0f}), "
            f"{statistics.median(r for _, _, r in runs):.0f} mails/s"
        )


if __name__ == "__main__":
    main()
