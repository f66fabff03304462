"""Test harness: real server processes and a plain socket client."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import resource
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

DOMAIN = "smtpd.com"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_sitecustomize(folder: Path, code: str, **env: str) -> dict[str, str]:
    """An environment for a server whose interpreter runs ``code`` at start
    (a ``sitecustomize`` module on PYTHONPATH), plus ``env``: how a test
    slows or steers one step inside the real server."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": str(folder), **env}


def wait_until(condition, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``condition`` until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs mounted at ``path`` for the test's duration (needs root)."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def as_user(name: str, cmd: list[str], scratch: Path) -> list[str]:
    """``cmd`` wrapped to run as user ``name`` with that user's groups only, as
    a service manager's User= does (needs root, util-linux's unshare and
    setpriv; each execs the next, so the pid is the command's own).

    The test's interpreter or package may sit in a folder closed to that user
    (a Python installed under /root): the command then runs in a private
    mount namespace where each such folder is covered by a stand-in (made in
    ``scratch``) holding only the entries it needs, bind-mounted. The host's
    mounts and modes stay as they are."""
    entry = pwd.getpwnam(name)
    setpriv = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--"]
    package = importlib.util.find_spec("prefork_smtpd").origin
    openings: dict[Path, set[str]] = {}  # closed folder -> entries the command needs in it
    for needed in {os.path.realpath(sys.executable), sys.base_prefix, sys.prefix, package}:
        path = Path(needed).resolve()
        for folder in reversed(path.parents):
            if not folder.stat().st_mode & stat.S_IXOTH:
                openings.setdefault(folder, set()).add(path.relative_to(folder).parts[0])
                break
    if not openings:
        return setpriv + cmd
    steps = []
    for number, (closed, entries) in enumerate(sorted(openings.items())):
        stand_in = scratch / f".stand-in-{number}"
        stand_in.mkdir(exist_ok=True)
        stand_in.chmod(0o711)
        for entry_name in sorted(entries):
            source, mount_point = closed / entry_name, stand_in / entry_name
            if source.is_dir():
                mount_point.mkdir(exist_ok=True)
            else:
                mount_point.touch()
            steps.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(mount_point))}")
        # --rbind: the stand-in brings its own bind mounts along.
        steps.append(f"mount --rbind {shlex.quote(str(stand_in))} {shlex.quote(str(closed))}")
    steps.append('exec "$@"')
    script = " && ".join(steps)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *setpriv, *cmd]


class Client:
    """A line-oriented SMTP client on a raw socket: sees every byte and reply."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text lines joined by \\n)."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            assert line.endswith(b"\r\n"), f"reply line not CRLF-terminated: {line!r}"
            lines.append(line[4:-2].decode())
            if line[3:4] == b" ":
                return int(line[:3]), "\n".join(lines)
            assert line[3:4] == b"-", f"bad reply line {line!r}"

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def xstat(self, what: str) -> int:
        code, text = self.cmd(f"XSTAT {what}")
        assert code == 250, text
        return int(text.rsplit(":", 1)[1])

    def mail(self, sender: str, recipients: list[str], body: bytes) -> tuple[int, str]:
        """One transaction on this connection; returns the reply to the final dot."""
        assert self.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        for rcpt in recipients:
            assert self.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert self.cmd("DATA")[0] == 354
        self.send(body + b"\r\n.\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        return self.file.read(1) == b""

    def reset(self) -> None:
        """Vanish with a TCP RST, as a crashed client would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def live(process: psutil.Process) -> bool:
    """Running, not a zombie. A child can be reaped between the listing of
    the children and this look (a retired worker leaving after a reload):
    it is gone, not a reason to see no child at all."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Server:
    """A real prefork-smtpd master with its workers, in a temporary folder;
    ``user``: run it as that user (the tests must run as root), as its
    systemd unit does."""

    def __init__(
        self, root: Path, *args: str, workers: int = 2, listen: str | None = "127.0.0.1",
        env: dict[str, str] | None = None, wait: bool = True, user: str | None = None,
    ) -> None:
        self.root = root
        self.mail_dir = root / "mail_dir"
        self.log_file = root / "logs" / "log.txt"
        self.workers = workers
        # A port found free can be taken by another program before the
        # server binds it (test suites run side by side): then try others.
        for attempt in range(5):
            self.port = free_port()
            self.config_port = free_port()
            cmd = [sys.executable, "-m", "prefork_smtpd", "--workers", str(workers), "-P", str(self.port)]
            cmd += ["-c", str(self.config_port), "--mail-dir", str(self.mail_dir), "--log-file", str(self.log_file)]
            cmd += ["--hostname", "mx.test"]
            if listen:
                cmd += ["-l", listen]
            cmd += list(args)
            if user is not None:
                cmd = as_user(user, cmd, root)
            self.stderr = open(root / "stderr.txt", "wb")
            self.proc = subprocess.Popen(
                cmd, cwd=root, stdout=self.stderr, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )
            if not wait:
                return
            try:
                self.wait_ready()
                return
            except AssertionError:
                if attempt == 4 or self.proc.poll() is None or "Address already in use" not in self.output():
                    raise
                self.stderr.close()

    def wait_ready(self, workers: int | None = None) -> None:
        """Wait until ``workers`` workers accept: their titles show a count then."""
        wanted = self.workers if workers is None else workers

        def ready() -> bool:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            return len(self.accepting_workers()) == wanted

        wait_until(ready, what="workers to accept")

    def output(self) -> str:
        self.stderr.flush()
        return (self.root / "stderr.txt").read_text(errors="replace")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_count(self, needle: str) -> int:
        return self.log_text().count(needle)

    def accepting_workers(self) -> list[int]:
        accepting = []
        for pid in self.worker_pids():
            try:
                if "connections]" in " ".join(psutil.Process(pid).cmdline()):
                    accepting.append(pid)
            except psutil.NoSuchProcess:
                pass
        return accepting

    def worker_pids(self) -> list[int]:
        """The master's live children (workers, and the queue runner if any)."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []  # the master is gone
        return [c.pid for c in children if live(c)]

    def client(self, **kw) -> Client:
        return Client(self.port, **kw)

    def stored(self, folder: str) -> list[Path]:
        new = self.mail_dir / folder / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def all_files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.stderr.close()
        return code

    def kill(self) -> None:
        """Tear down at once: the master and every worker it had, even
        workers the master no longer reaps (it is killed first)."""
        workers = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
