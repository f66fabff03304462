"""``prefork-smtpd-users``, driven as an operator would: the installed script."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import wait_until

from prefork_smtpd.cli.users import DEFAULT_FILE, Refused, build_parser, users_file
from prefork_smtpd.users import load_users


def script() -> str:
    beside = Path(sys.executable).parent / "prefork-smtpd-users"
    found = str(beside) if beside.exists() else shutil.which("prefork-smtpd-users")
    assert found, "prefork-smtpd-users is not installed (pip install -e .)"
    return found


def run(*args: str, password: str | bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    data = password.encode() if isinstance(password, str) else password
    return subprocess.run([script(), *args], input=data, capture_output=True, timeout=timeout)


def add(path: Path, name: str, password: str, *extra: str) -> subprocess.CompletedProcess:
    return run("--file", str(path), "add", name, "--stdin", *extra, password=password + "\n")


@pytest.fixture
def users_path(tmp_path) -> Path:
    folder = tmp_path / "etc"
    folder.mkdir()
    return folder / "users"


@pytest.mark.slow
def test_an_edit_through_a_link_changes_the_file_the_link_names(tmp_path):
    # The file Dovecot reads may be reached by a link (a config folder of
    # links): the edit replaced the link with a new file, and the file the
    # readers use never saw the user.
    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    assert add(real / "users", "alice", "pw-a").returncode == 0
    (links / "users").symlink_to("../real/users")
    r = add(links / "users", "bob", "pw-b")
    assert r.returncode == 0, r.stderr
    assert (links / "users").is_symlink()
    table = load_users(str(real / "users"))
    assert table.verify("alice", "pw-a") and table.verify("bob", "pw-b")
    assert sorted(p.name for p in real.iterdir()) == ["users"] and sorted(p.name for p in links.iterdir()) == ["users"]


@pytest.mark.slow
def test_add_creates_the_file_with_mode_0640(users_path):
    r = add(users_path, "Alice@SMTPD.com", "s3cret")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"alice@smtpd.com: added (ARGON2ID)\n"
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o640
    text = users_path.read_text()
    assert text.startswith("alice@smtpd.com:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
    assert text.endswith("\n") and text.count("\n") == 1
    table = load_users(str(users_path))
    assert table.verify("alice@smtpd.com", "s3cret")
    assert not table.verify("alice@smtpd.com", "s3cret\n")
    assert list(users_path.parent.iterdir()) == [users_path]  # no temporary file left


def test_add_with_blf_crypt_and_crlf_on_stdin(users_path):
    r = run("--file", str(users_path), "--scheme", "blf-crypt", "add", "bob", "--stdin", password=b"p w\r\n")
    assert r.returncode == 0, r.stderr
    assert users_path.read_text().startswith("bob:{BLF-CRYPT}$2y$12$")
    assert load_users(str(users_path)).verify("bob", "p w")


def test_options_after_the_command(users_path):
    r = run("add", "carol", "--stdin", "--scheme", "BLF-CRYPT", "--file", str(users_path), password="x\n")
    assert r.returncode == 0, r.stderr
    assert "carol:{BLF-CRYPT}" in users_path.read_text()


def test_add_twice_is_refused_and_changes_nothing(users_path):
    assert add(users_path, "alice", "one").returncode == 0
    before = users_path.read_bytes()
    r = add(users_path, "ALICE", "two")
    assert r.returncode == 1
    assert b"alice: already in" in r.stderr and b"use passwd" in r.stderr
    assert users_path.read_bytes() == before


PRESERVED = (
    "# Users of smtpd.com: shared with Dovecot\n"
    "\n"
    "{line_alice}:1000:1000:Alice:/home/alice:/bin/false:userdb_quota_rule=*:storage=1G\r\n"
    "# bob is next\n"
    "{line_bob}\n"
    "   \n"
    "# trailing comment without newline"
)


@pytest.fixture
def populated(users_path) -> tuple[Path, str, str]:
    """A file with comments, Dovecot fields, CRLF, blanks and no final LF."""
    assert add(users_path, "alice", "alpha").returncode == 0
    assert add(users_path, "bob", "bravo").returncode == 0
    alice, bob = users_path.read_text().splitlines()
    users_path.write_text(PRESERVED.format(line_alice=alice, line_bob=bob), newline="")
    return users_path, alice, bob


@pytest.mark.slow
def test_passwd_changes_one_field_and_keeps_everything_else(populated):
    path, _, bob = populated
    r = run("--file", str(path), "passwd", "alice", "--stdin", "--scheme", "BLF-CRYPT", password="new one\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"alice: password changed (BLF-CRYPT)\n"
    text = path.read_bytes().decode()
    lines = text.split("\n")
    assert lines[2].startswith("alice:{BLF-CRYPT}$2y$12$")
    assert lines[2].endswith(":1000:1000:Alice:/home/alice:/bin/false:userdb_quota_rule=*:storage=1G\r")
    new_alice = lines[2][: -len(":1000:1000:Alice:/home/alice:/bin/false:userdb_quota_rule=*:storage=1G\r")]
    assert text == PRESERVED.format(line_alice=new_alice, line_bob=bob)
    table = load_users(str(path))
    assert table.verify("alice", "new one")
    assert not table.verify("alice", "alpha")
    assert table.verify("bob", "bravo")


def test_delete_removes_one_line_only(populated):
    path, alice, bob = populated
    r = run("--file", str(path), "delete", "Bob")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"bob: deleted\n"
    expected = PRESERVED.format(line_alice=alice, line_bob=bob).replace(bob + "\n", "")
    with open(path, newline="") as f:
        assert f.read() == expected
    assert load_users(str(path)).names() == ["alice"]


def test_list(populated):
    path, _, _ = populated
    r = run("--file", str(path), "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"alice\tARGON2ID\nbob\tARGON2ID\n"


@pytest.mark.parametrize("verb", ["passwd", "delete"])
def test_unknown_user_is_refused(populated, verb):
    path, _, _ = populated
    before = path.read_bytes()
    r = run("--file", str(path), verb, "carol", *(["--stdin"] if verb == "passwd" else []), password="x\n")
    assert r.returncode == 1
    assert b"carol: no such user in " + str(path).encode() in r.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("args", [("passwd", "alice", "--stdin"), ("delete", "alice"), ("list",)])
def test_missing_file_is_refused(users_path, args):
    r = run("--file", str(users_path), *args, password="x\n")
    assert r.returncode == 1
    assert r.stderr == f"prefork-smtpd-users: {users_path}: no such users file\n".encode()
    assert not users_path.exists()


@pytest.mark.parametrize(
    "name, reason",
    [
        ("a:b", b"':' in name"),
        ("a\x01b", b"control character"),
        ("a b", b"not a mailbox name"),
        ("../etc", b"not a mailbox name"),
        ("alice@", b"not a mailbox name"),
        ("x" * 65, b"name too long"),
        ("#alice", b"'#' at the start of a name"),
    ],
)
def test_bad_names_are_refused(users_path, name, reason):
    r = add(users_path, name, "pw")
    assert r.returncode == 1
    assert reason in r.stderr
    assert not users_path.exists()


@pytest.mark.parametrize(
    "password, reason",
    [
        (b"\n", b"empty password"),
        (b"", b"empty password"),
        (b"\xff\xfe\n", b"not UTF-8"),
        (b"a\0b\n", b"NUL"),
    ],
)
def test_bad_passwords_are_refused(users_path, password, reason):
    r = run("--file", str(users_path), "add", "alice", "--stdin", password=password)
    assert r.returncode == 1
    assert reason in r.stderr
    assert not users_path.exists()


def test_blf_crypt_refuses_passwords_over_72_octets(users_path):
    r = add(users_path, "alice", "x" * 73, "--scheme", "BLF-CRYPT")
    assert r.returncode == 1
    assert b"72 octets" in r.stderr
    assert not users_path.exists()
    assert add(users_path, "alice", "x" * 73).returncode == 0  # argon2id reads it all


def test_a_broken_file_is_never_edited(users_path):
    users_path.write_text("# ok\nalice:{PLAIN}secret\n")
    for args in (("add", "bob", "--stdin"), ("delete", "alice"), ("list",)):
        r = run("--file", str(users_path), *args, password="pw\n")
        assert r.returncode == 1
        assert f"{users_path}:2: plaintext password".encode() in r.stderr
        assert b"fix it first" in r.stderr
    assert users_path.read_text() == "# ok\nalice:{PLAIN}secret\n"


def test_unknown_scheme_option_is_a_usage_error(users_path):
    r = add(users_path, "alice", "pw", "--scheme", "PLAIN")
    assert r.returncode == 2
    assert b"invalid choice" in r.stderr


@pytest.mark.root("changes a file's owner")
def test_rewrite_keeps_owner_and_group_and_sets_0640(populated):
    path, _, _ = populated
    os.chown(path, 1, 1)
    os.chmod(path, 0o644)
    assert run("--file", str(path), "delete", "bob").returncode == 0
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1, 1)
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_config_file_names_the_users_file(tmp_path, users_path):
    config = tmp_path / "smtpd.toml"
    config.write_text(f'workers = 2\nusers = "{users_path}"\n')
    r = run("--config", str(config), "add", "alice", "--stdin", password="pw\n")
    assert r.returncode == 0, r.stderr
    assert load_users(str(users_path)).names() == ["alice"]
    # --file wins over the config file.
    other = tmp_path / "other"
    r = run("--config", str(config), "--file", str(other), "add", "bob", "--stdin", password="pw\n")
    assert r.returncode == 0, r.stderr
    assert load_users(str(other)).names() == ["bob"]
    assert load_users(str(users_path)).names() == ["alice"]


def test_config_file_problems(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("users = [\n")
    r = run("--config", str(bad), "list")
    assert r.returncode == 1 and str(bad).encode() in r.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("users = 3\n")
    r = run("--config", str(wrong), "list")
    assert r.returncode == 1 and b"'users' must be a file name" in r.stderr
    r = run("--config", str(tmp_path / "absent.toml"), "list")
    assert r.returncode == 1 and b"absent.toml: No such file" in r.stderr
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'users = "\xe9"\n')
    r = run("--config", str(latin1), "list")  # as the server and the config tool say it
    assert r.returncode == 1 and b"latin1.toml: not UTF-8 text" in r.stderr


def test_default_file(tmp_path):
    no_key = tmp_path / "c.toml"
    no_key.write_text("workers = 2\n")
    assert users_file(build_parser().parse_args(["list"])) == DEFAULT_FILE == "/etc/prefork-smtpd/users"
    assert users_file(build_parser().parse_args(["--config", str(no_key), "list"])) == DEFAULT_FILE


@pytest.mark.parametrize("flags", [["--file", ""], ["--config", ""], ["--file", "", "--config", "x.toml"]])
def test_an_empty_file_name_is_refused_not_taken_for_the_default(flags):
    # Parsed only: on the code before, this named the system's users file.
    with pytest.raises(Refused, match=f"--{flags[0][2:]} must name a file"):
        users_file(build_parser().parse_args([*flags, "list"]))


def blocked_on_a_lock(pid: int) -> bool:
    """True once ``pid`` waits for a lock (a "->" line in /proc/locks)."""
    with open("/proc/locks") as f:
        return any("->" in line and f" {pid} " in line for line in f)


def test_edits_wait_for_the_folder_lock(populated):
    # Two edits at once would each read the old file and the second rename
    # would drop the first one's change: an edit must wait for the lock.
    path, _, _ = populated
    before = path.read_bytes()
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [script(), "--file", str(path), "add", "carol", "--stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdin.write(b"pw\n")
        proc.stdin.close()
        wait_until(lambda: blocked_on_a_lock(proc.pid) or proc.poll() is not None, timeout=60, what="add to block")
        assert proc.poll() is None, proc.stderr.read()
        assert path.read_bytes() == before
    finally:
        os.close(folder)  # releases the lock
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert load_users(str(path)).names() == ["alice", "bob", "carol"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["users"]  # no temporary file left


# ------------------------------------------------ the prompt, on a terminal
def run_on_terminal(args: list[str], answers: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run the script with a pseudo-terminal as its controlling terminal
    (where getpass reads), answering each prompt in turn."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.execv(script(), [script(), *args])
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + timeout
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # getpass flushes typed-ahead input before it prompts: answer
            # each prompt only once it has been shown.
            prompts = output.count(b"New password for ") + output.count(b"Retype the password: ")
            while pending and len(answers) - len(pending) < prompts:
                os.write(fd, pending.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_prompt_asks_twice(users_path):
    code, output = run_on_terminal(["--file", str(users_path), "add", "alice"], ["typed pw", "typed pw"])
    assert code == 0, output
    assert "New password for alice:" in output and "Retype the password:" in output
    assert "typed pw" not in output  # no echo
    assert load_users(str(users_path)).verify("alice", "typed pw")


def test_prompt_refuses_two_different_passwords(users_path):
    code, output = run_on_terminal(["--file", str(users_path), "add", "alice"], ["one", "two"])
    assert code == 1, output
    assert "the passwords differ; nothing changed" in output
    assert not users_path.exists()


# ------------------------------------------------ Dovecot reads the same file
DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
DOVEADM = shutil.which("doveadm", path="/usr/bin:/usr/sbin:" + os.environ.get("PATH", ""))


def dovecot_auth(config: Path, socket_path: Path, name: str, password: str) -> bool:
    r = subprocess.run(
        [DOVEADM, "-c", str(config), "auth", "test", "-a", str(socket_path), name, password],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode in (0, 77), (r.stdout, r.stderr)  # 77: authentication failed
    return r.returncode == 0 and "auth succeeded" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    DOVECOT is None or DOVEADM is None, reason="Dovecot not installed (Debian package dovecot-core): not checked"
)
@pytest.mark.root("Dovecot's own test instance drops to 'nobody'")
def test_dovecot_authenticates_against_a_file_we_wrote():
    """The point of the format: Dovecot's passwd-file driver reads our file,
    comments, Dovecot fields, both schemes and lowercased names included,
    and still can after an edit (the rewrite keeps the group it reads by)."""
    with tempfile.TemporaryDirectory(prefix="smtpd-dovecot-") as temp:
        root = Path(temp)
        os.chmod(root, 0o755)  # Dovecot's auth process runs as nobody
        users = root / "users"
        assert add(users, "Alice@smtpd.com", "alpha pw").returncode == 0
        assert add(users, "bob", "bravo", "--scheme", "BLF-CRYPT").returncode == 0
        users.write_text("# shared with Dovecot\n" + users.read_text().replace("\nbob:", "\n\nbob:"))
        users.write_text(users.read_text().rstrip("\n") + ":::::::\n")  # empty Dovecot fields on bob
        os.chown(users, 0, 65534)  # group nogroup may read it: mode 0640
        assert run("--file", str(users), "passwd", "alice@smtpd.com", "--stdin", password="new pw\n").returncode == 0
        assert users.stat().st_gid == 65534
        config = root / "dovecot.conf"
        run_dir = root / "run"
        config.write_text(
            f"base_dir = {run_dir}\n"
            f"state_dir = {root / 'state'}\n"
            f"log_path = {root / 'dovecot.log'}\n"
            "instance_name = prefork-smtpd-test\n"
            "protocols =\n"
            "listen = 127.0.0.1\n"
            "ssl = no\n"
            "default_internal_user = nobody\n"
            "default_internal_group = nogroup\n"
            "default_login_user = nobody\n"
            f"passdb {{\n  driver = passwd-file\n  args = {users}\n}}\n"
            f"userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={root}/home/%u\n}}\n"
        )
        proc = subprocess.Popen([DOVECOT, "-F", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            socket_path = run_dir / "auth-client"
            wait_until(
                lambda: socket_path.exists() or proc.poll() is not None, timeout=60, what="Dovecot's auth socket"
            )
            assert proc.poll() is None, proc.stdout.read()
            assert dovecot_auth(config, socket_path, "alice@smtpd.com", "new pw")
            assert dovecot_auth(config, socket_path, "ALICE@smtpd.com", "new pw")  # Dovecot lowercases too
            assert not dovecot_auth(config, socket_path, "alice@smtpd.com", "alpha pw")
            assert dovecot_auth(config, socket_path, "bob", "bravo")
            assert not dovecot_auth(config, socket_path, "bob", "wrong")
            assert not dovecot_auth(config, socket_path, "carol", "bravo")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
