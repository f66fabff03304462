"""The benchmark's own parts, so they cannot rot between full runs: the
Postfix contender starts from its throwaway config and delivers, and the
bench's quick mode runs end to end on a tiny load."""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import free_port, wait_until

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from postfix import PostfixInstance  # noqa: E402

needs_postfix = pytest.mark.skipif(not os.path.exists(PostfixInstance.program()),
                                   reason="Postfix is not installed (run-tests installs it)")


@pytest.mark.slow
@pytest.mark.root("Postfix starts as root")
@needs_postfix
def test_postfix_contender_starts_and_delivers_into_maildir():
    # Not under pytest's tmp_path: its folders are closed to Postfix's users.
    root = Path(tempfile.mkdtemp(prefix="bench-test-postfix-"))
    instance = PostfixInstance(root, free_port())
    instance.start()
    try:
        master = instance.master_pid()
        assert master and "master" in Path(f"/proc/{master}/comm").read_text()
        client = wait_until(lambda: _connect(instance.port), timeout=60, what="Postfix's greeting")
        refused = client.sendmail("a@smtpd.com", ["b@smtpd.com", "3b@smtpd.com"],
                                  b"Subject: bench smoke\r\n\r\nhello\r\n")
        client.quit()
        assert refused == {}
        # One copy per recipient folder, as prefork-smtpd stores: b/ and 3b/.
        wait_until(lambda: instance.stored() == 2, timeout=60, what="both copies in Maildir")
        for folder in ("b", "3b"):
            (mail,) = (instance.maildir / folder / "new").iterdir()
            assert b"Subject: bench smoke" in mail.read_bytes()
        # Its own queue and log, nothing under the system's /var/spool/postfix.
        assert (root / "queue" / "pid" / "master.pid").exists()
        assert "daemon started" in instance.log()
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not Path(f"/proc/{master}").exists()


def _connect(port: int) -> smtplib.SMTP | None:
    try:
        return smtplib.SMTP("127.0.0.1", port, timeout=30)
    except OSError:
        return None


@pytest.mark.slow
def test_bench_quick_mode_runs_and_writes_its_report(tmp_path):
    servers = "w1,smtp-sink" + (",postfix" if os.geteuid() == 0 and os.path.exists(PostfixInstance.program())
                                else "")
    output = tmp_path / "RESULTS.md"
    env = {**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin"}
    result = subprocess.run(
        [sys.executable, "-P", str(BENCH / "run.py"), "--quick", "--rounds", "1", "--only", "S2,S8,T2,R1",
         "--servers", servers, "--output", str(output)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    assert "| prefork-smtpd -w1 | " in report and "| smtp-sink | " in report
    assert "| prefork-smtpd -w1 TLS | " in report  # T2 through tls_load.py
    assert "CPU per mail" in report
    if "postfix" in servers:
        assert "| Postfix, acknowledged | " in report and "| Postfix, all in Maildir | " in report
    # Every cell measured: a failed contender would have stopped the run.
    throughput = report.split("## Throughput")[1].split("\n\n")[1]
    assert " - " not in throughput
    # R1: relayed to the receiver, both figures measured, smtp-sink (which cannot relay) left out.
    relay = report.split("## R1: relay")[1].split("\n\n")[1]
    assert "| prefork-smtpd -w1 | " in relay and "smtp-sink" not in relay and " - " not in relay
    if "postfix" in servers:
        assert "| Postfix | " in relay
