"""A fleet: prefork-smtpd nodes behind a real HAProxy, watched by a real Prometheus.

deploy/fleet/ is the worked example, and these tests run its files as they
ship, with only addresses, ports and paths pointed at free ports and a
temporary folder (``Shipped.fill``: a shipped value that is no longer there
fails loudly, so the example cannot drift from what is tested):

* promtool checks the Prometheus config and both rule files, and runs the
  rules' own unit tests (deploy/fleet/rules-test.yml);
* two nodes, HAProxy (mode tcp, leastconn, smtpchk) and Prometheus scraping
  both nodes: 2,000 mails from Postfix's smtp-source through HAProxy, each
  on disk, both nodes with a share, Prometheus' fleet total agreeing; then
  one node stopped gracefully while clients keep sending, and no mail it
  acknowledged is lost while HAProxy moves new sessions to the other.

Needs the Debian packages haproxy, prometheus (promtool comes with it) and
postfix (smtp-source); ``./run-tests`` installs them. A missing one fails
these tests: they are the only proof the example works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from harness import DOMAIN, Client, Server, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from prefork_smtpd.config_file import load_config_file
from test_operations import ConfigLine

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "deploy" / "fleet"
MiB = 1024 * 1024

# The shipped node.toml trusts the example's balancer address; here HAProxy
# connects from loopback.
TRUST_THE_TEST_BALANCER = ("--trusted-proxies", "127.0.0.1")


def program(name: str, package: str) -> str:
    """The path of a Debian program the fleet tests drive; fail (not skip) without it."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
    assert found, f"{name} is not installed: apt-get install {package} (./run-tests does)"
    return found


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# ------------------------------------------------------------ the disk reserve
def test_metrics_show_the_free_space_and_the_reserve_the_workers_enforce(start_server):
    """The disk-reserve alert compares two gauges: they must be the figures
    the workers refuse mail by, and follow a live change of the reserve."""
    mport = free_port()
    server = start_server("--metrics-port", str(mport), "--min-free-space", str(MiB), workers=1)
    before = os.statvfs(server.mail_dir)
    metrics = scrape(mport)
    after = os.statvfs(server.mail_dir)
    assert metrics[("smtpd_min_free_space_bytes", ())] == MiB
    free = metrics[("smtpd_mail_dir_free_bytes", ())]
    # Other programs write on this file system meanwhile: allow for them.
    low = min(before.f_bavail, after.f_bavail) * before.f_frsize - 256 * MiB
    high = max(before.f_bavail, after.f_bavail) * before.f_frsize + 256 * MiB
    assert low <= free <= high

    # Past the free space, the reserve is reached: the gauges say so, and the
    # workers refuse mail with 452 by the same figures.
    reserve = int(free) + 1024 * MiB
    assert ConfigLine(server.config_port).send(f"min_free_space={reserve}") == ["OK"]
    metrics = scrape(mport)
    assert metrics[("smtpd_min_free_space_bytes", ())] == reserve
    assert metrics[("smtpd_mail_dir_free_bytes", ())] < metrics[("smtpd_min_free_space_bytes", ())]
    c = server.client()
    c.cmd("EHLO client.example")
    code, text = c.cmd(f"MAIL FROM:<a@{DOMAIN}>")
    assert code == 452, text

    # 0 turns the check off: the gauge says 0, the alert's `> 0` stays quiet.
    assert ConfigLine(server.config_port).send("min_free_space=0") == ["OK"]
    assert scrape(mport)[("smtpd_min_free_space_bytes", ())] == 0
    assert c.cmd(f"MAIL FROM:<a@{DOMAIN}>")[0] == 250


# ------------------------------------------------------------ the shipped files
class Shipped:
    """A file of deploy/fleet/ with some of its values replaced; each value
    must be in the file as often as expected, so a changed example fails
    here instead of drifting away from what the tests run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = (FLEET / name).read_text()

    def fill(self, old: str, new: str, count: int = 1) -> "Shipped":
        found = self.text.count(old)
        assert found == count, f"deploy/fleet/{self.name}: {old!r} found {found} times, expected {count}"
        self.text = self.text.replace(old, new)
        return self

    def write(self, folder: Path) -> Path:
        path = folder / self.name
        path.write_text(self.text)
        return path


def promtool(*args: str, cwd: Path = FLEET) -> str:
    done = subprocess.run(
        [program("promtool", "prometheus"), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_node_config_is_accepted():
    settings = load_config_file(str(FLEET / "node.toml"))
    assert (settings["metrics_port"], settings["port"]) == (9101, 2525)
    # The nodes read the PROXY header HAProxy's send-proxy-v2 puts first.
    assert (settings["proxy_protocol"], settings["trusted_proxies"]) == ("smtp", "10.0.0.5")


def test_promtool_accepts_the_config_and_the_rules():
    out = promtool("check", "rules", "recording-rules.yml", "alert-rules.yml")
    assert "SUCCESS: 11 rules found" in out and "SUCCESS: 6 rules found" in out, out
    out = promtool("check", "config", "prometheus.yml")
    assert "is valid prometheus config file syntax" in out and "2 rule files found" in out, out
    # The rules' own unit tests: what each alert and recording rule gives
    # for series such as the nodes' /metrics show.
    assert "SUCCESS" in promtool("test", "rules", "rules-test.yml")


def test_promtool_would_catch_a_broken_rule(tmp_path):
    """The checks above can fail: a rule file with a wrong expectation, and
    one naming a metric the expression misspells, are refused."""
    for name in ("recording-rules.yml", "alert-rules.yml"):
        shutil.copy(FLEET / name, tmp_path / name)
    Shipped("rules-test.yml").fill(
        "summary: \"prefork-smtpd node1 (10.0.0.11:9101) does not answer\"",
        "summary: \"prefork-smtpd node2 (10.0.0.12:9101) does not answer\"",
    ).write(tmp_path)
    done = subprocess.run([program("promtool", "prometheus"), "test", "rules", "rules-test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
    broken = Shipped("alert-rules.yml").fill('expr: up{job="prefork-smtpd"} == 0', 'expr: up{job="prefork-smtpd" == 0')
    broken.write(tmp_path)
    done = subprocess.run([program("promtool", "prometheus"), "check", "rules", "alert-rules.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout


# ------------------------------------------------------------ one change, every node
def each_node(nodes: list[str], *messages: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NODES": " ".join(nodes)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # prefork-smtpd-config
    return subprocess.run([str(FLEET / "each-node"), *messages], env=env, capture_output=True, text=True, timeout=120)


def test_each_node_applies_a_change_to_every_node_and_names_those_that_refused(start_server):
    """The config port is per node: each-node takes one change to all of them."""
    one, two = start_server(workers=1), start_server(workers=1)
    nodes = [f"127.0.0.1:{one.config_port}", f"127.0.0.1:{two.config_port}"]
    done = each_node(nodes, "max_recipients=7", "max_connections_per_ip=20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{node}: OK" for node in nodes]
    for server in (one, two):
        shown = ConfigLine(server.config_port).show()
        assert (shown["max_recipients"], shown["max_connections_per_ip"]) == (7, 20)

    # A node that refuses a value, and one that does not answer, are named
    # and make the run fail; the others still take the change.
    gone = f"127.0.0.1:{free_port()}"
    done = each_node([*nodes, gone], "max_recipients=0")
    assert done.returncode == 1
    assert done.stderr.count(": FAILED") == 3, done.stderr
    done = each_node([nodes[0], gone], "max_recipients=9")
    assert done.returncode == 1 and f"{gone}: FAILED" in done.stderr and done.stdout == f"{nodes[0]}: OK\n"
    assert ConfigLine(one.config_port).show()["max_recipients"] == 9
    assert ConfigLine(two.config_port).show()["max_recipients"] == 7


# ------------------------------------------------------------ the fleet
class Prometheus:
    """A real Prometheus on the shipped prometheus.yml and rule files."""

    def __init__(self, root: Path, targets: dict[str, int], haproxy_metrics: int) -> None:
        root.mkdir()
        config = Shipped("prometheus.yml")
        config.fill("scrape_interval: 15s", "scrape_interval: 1s")
        config.fill("evaluation_interval: 15s", "evaluation_interval: 1s")
        config.fill('"10.0.0.11:9101"', f'"127.0.0.1:{targets["node1"]}"')
        config.fill('"10.0.0.12:9101"', f'"127.0.0.1:{targets["node2"]}"')
        config.fill('"10.0.0.5:8405"', f'"127.0.0.1:{haproxy_metrics}"')
        path = config.write(root)
        for name in ("recording-rules.yml", "alert-rules.yml"):
            shutil.copy(FLEET / name, root / name)
        self.log = open(root / "prometheus.log", "wb")
        for attempt in range(5):  # the free port may be taken meanwhile
            self.port = free_port()
            self.proc = subprocess.Popen(
                [program("prometheus", "prometheus"), f"--config.file={path}",
                 f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=self.log, stderr=subprocess.STDOUT,
            )
            try:
                wait_until(self.ready, timeout=120, interval=0.2, what="Prometheus to be ready")
                return
            except AssertionError:
                if attempt == 4 or self.proc.poll() is None:
                    raise

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.output()}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5).status == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> object:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        reply = json.loads(urllib.request.urlopen(url, timeout=20).read())
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query: the value of each series, keyed by its `node`,
        `server` or no label."""
        data = self.api("query", query=expr)
        return {
            r["metric"].get("node") or r["metric"].get("server") or "": float(r["value"][1]) for r in data["result"]
        }

    def alerts(self, name: str) -> dict[str, str]:
        """The pending or firing alerts called ``name``: node -> state."""
        return {
            a["labels"].get("node") or a["labels"].get("server", ""): a["state"]
            for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class HAProxy:
    """A real HAProxy on the shipped haproxy.cfg."""

    def __init__(self, root: Path, nodes: dict[str, int]) -> None:
        root.mkdir()
        self.log = open(root / "haproxy.log", "wb")
        for attempt in range(5):
            self.port, self.metrics_port = free_port(), free_port()
            config = Shipped("haproxy.cfg")
            config.fill("bind :25\n", f"bind 127.0.0.1:{self.port}\n")
            config.fill("bind 10.0.0.5:8405\n", f"bind 127.0.0.1:{self.metrics_port}\n")
            config.fill("server node1 10.0.0.11:2525", f"server node1 127.0.0.1:{nodes['node1']}")
            config.fill("server node2 10.0.0.12:2525", f"server node2 127.0.0.1:{nodes['node2']}")
            path = config.write(root)
            self.proc = subprocess.Popen([program("haproxy", "haproxy"), "-f", str(path), "-db"],
                                         stdout=self.log, stderr=subprocess.STDOUT)
            try:
                wait_until(self.accepts, timeout=60, interval=0.1, what="HAProxy to accept")
                return
            except AssertionError:
                if attempt == 4 or self.proc.poll() is None:
                    raise

    def accepts(self) -> bool:
        assert self.proc.poll() is None, f"haproxy exited: {self.output()}"
        for port in (self.port, self.metrics_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError:
                return False
        return True

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_node(tmp_path: Path, name: str, node_toml: Path) -> Server:
    root = tmp_path / name
    root.mkdir()
    metrics_port = free_port()
    flags = ["--config", str(node_toml), "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
             "--hostname", f"{name}.test", *TRUST_THE_TEST_BALANCER]
    node = Server(root, *flags, workers=2)
    node.metrics_port = metrics_port  # type: ignore[attr-defined]
    return node


@pytest.fixture
def fleet(tmp_path):
    """Two nodes on the shipped node.toml, HAProxy in front, Prometheus
    watching: all real, on free ports, stopped after the test."""
    (tmp_path / "etc").mkdir()
    node_toml = Shipped("node.toml").write(tmp_path / "etc")
    started: list = []
    try:
        nodes = {}
        for name in ("node1", "node2"):
            nodes[name] = start_node(tmp_path, name, node_toml)
            started.append(nodes[name])
        haproxy = HAProxy(tmp_path / "haproxy", {name: n.port for name, n in nodes.items()})
        started.append(haproxy)
        prometheus = Prometheus(tmp_path / "prometheus", {name: n.metrics_port for name, n in nodes.items()},
                                haproxy.metrics_port)
        started.append(prometheus)
        yield nodes, haproxy, prometheus
    finally:
        for part in reversed(started):
            if isinstance(part, Server):
                part.kill()
            else:
                part.stop()


def smtp_source(port: int, mails: int, recipient: str, sessions: int = 20) -> float:
    """Postfix's load generator: ``mails`` mails of 1 KiB, one connection
    each, ``sessions`` at a time. Returns the seconds it took."""
    cmd = [program("smtp-source", "postfix"), "-s", str(sessions), "-m", str(mails), "-l", "1024",
           "-f", f"sender@{DOMAIN}", "-t", f"{recipient}@{DOMAIN}", "-M", "client.example", f"127.0.0.1:{port}"]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and not done.stderr.strip(), f"smtp-source: {done.returncode} {done.stderr}"
    return time.monotonic() - started


def complete_mails(nodes: list[Server], folder: str) -> dict[Server, int]:
    """How many mails smtp-source sent each node's ``folder`` holds, each one
    checked whole (smtp-source sends one body to all) and each its own
    (no Message-Id twice, over all nodes: a retry never doubled a mail)."""
    bodies, ids, counts = set(), [], {}
    for node in nodes:
        files = node.stored(folder)
        counts[node] = len(files)
        for path in files:
            headers, _, body = path.read_bytes().partition(b"\n\n")
            bodies.add(body)
            ids += re.findall(rb"^Message-Id: (.+)$", headers, re.MULTILINE)
    # -l 1024: the body is 1 KiB as sent, with CRLF line ends; stored with LF.
    assert len(bodies) <= 1 and all(len(body.replace(b"\n", b"\r\n")) >= 1024 for body in bodies), bodies
    assert len(ids) == len(set(ids)) == sum(counts.values()), "a Message-Id missing or stored twice"
    return counts


TOKEN = re.compile(rb"^X-Fleet-Token: (\S+)$", re.MULTILINE)


class Senders:
    """Threads sending one mail per connection through HAProxy, as a
    sender's MTA does, each with a token of its own; a mail counts as
    acknowledged only on a 250 to its final dot."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.acknowledged: list[tuple[str, float]] = []  # token, when its connection was opened
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def run(self, number: int) -> None:
        serial = 0
        while not self.stopping.is_set():
            serial += 1
            token = f"t{number}-{serial}"
            opened = time.monotonic()
            try:
                client = Client(self.port, timeout=60)
                try:
                    assert client.greeting[0] == 220, client.greeting
                    client.cmd("EHLO client.example")
                    body = f"Subject: fleet {token}\r\nX-Fleet-Token: {token}\r\n\r\nfrom a sender's MTA\r\n"
                    code, text = client.mail(f"sender@{DOMAIN}", [f"stop@{DOMAIN}"], body.encode())
                    if code != 250:
                        raise AssertionError(f"{code} {text}")
                    with self.lock:
                        self.acknowledged.append((token, opened))
                    client.cmd("QUIT")
                finally:
                    client.close()
            except (OSError, ConnectionError, AssertionError) as exc:
                # Not acknowledged: a sender's MTA keeps it and tries again.
                with self.lock:
                    self.failures.append(f"{token}: {exc!r}")
                time.sleep(0.05)

    def count(self, opened_after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for _, opened in self.acknowledged if opened > opened_after)

    def tokens(self, opened_after: float = 0.0) -> set[str]:
        with self.lock:
            return {token for token, opened in self.acknowledged if opened > opened_after}

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a sender hangs"


def tokens(node: Server, folder: str) -> set[str]:
    found = set()
    for path in node.stored(folder):
        match = TOKEN.search(path.read_bytes())
        assert match, f"{path}: no token"
        found.add(match.group(1).decode())
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)  # its waits are generous, for a loaded machine
def test_fleet_behind_haproxy_counted_by_prometheus_survives_a_node_stop(fleet):
    nodes, haproxy, prometheus = fleet
    node1, node2 = nodes["node1"], nodes["node2"]
    measured: dict[str, object] = {}

    # Prometheus scrapes both nodes and HAProxy, and the recording rules run.
    wait_until(lambda: prometheus.query('up{job="prefork-smtpd"} == 1').keys() == {"node1", "node2"},
               timeout=120, interval=0.5, what="Prometheus to scrape both nodes")
    wait_until(lambda: prometheus.query("fleet:smtpd_nodes_up:sum") == {"": 2.0},
               timeout=120, interval=0.5, what="the recording rules")
    wait_until(lambda: prometheus.query('haproxy_server_status{state="UP"} == 1').keys() == {"node1", "node2"},
               timeout=120, interval=0.5, what="HAProxy's checks to pass on both nodes")

    # 2,000 mails through HAProxy: both nodes take a share, every one is on disk.
    seconds = smtp_source(haproxy.port, 2000, "fleet")
    counts = complete_mails([node1, node2], "fleet")
    shares = {name: counts[node] for name, node in nodes.items()}
    measured["2000 mails through HAProxy, s"] = round(seconds, 1)
    measured["shares"] = shares
    assert sum(shares.values()) == 2000, shares
    assert all(share >= 200 for share in shares.values()), f"leastconn left a node idle: {shares}"
    # Each session came with HAProxy's PROXY v2 header naming the sender.
    assert all(node.log_count("(via proxy [127.0.0.1]:") >= 200 for node in (node1, node2))

    # Prometheus agrees: the fleet total, and each node's own count.
    finished = time.monotonic()
    wait_until(lambda: prometheus.query('sum(smtpd_mails_total{job="prefork-smtpd"})') == {"": 2000.0},
               timeout=180, interval=0.2, what="Prometheus' fleet total to reach 2000")
    measured["Prometheus agreed after, s"] = round(time.monotonic() - finished, 2)
    assert prometheus.query('smtpd_mails_total{job="prefork-smtpd"}') == {k: float(v) for k, v in shares.items()}
    wait_until(lambda: prometheus.query("fleet:smtpd_mails:rate1m").get("", 0) > 0,
               timeout=120, interval=0.5, what="the fleet's mail rate")

    # Senders keep sending while node1 stops gracefully: every mail a node
    # acknowledged is on its disk, and HAProxy takes new sessions to node2.
    senders = Senders(haproxy.port)
    try:
        wait_until(lambda: senders.count() >= 40, timeout=180, interval=0.05, what="mails before the stop")
        assert node1.stop(signal.SIGTERM, timeout=120) == 0, node1.output()
        gone = time.monotonic()
        wait_until(lambda: senders.count(opened_after=gone) >= 40, timeout=180, interval=0.05,
                   what="mails after the stop")
    finally:
        senders.stop()
    acknowledged = senders.tokens()
    on_node1, on_node2 = tokens(node1, "stop"), tokens(node2, "stop")
    lost = acknowledged - on_node1 - on_node2
    assert not lost, f"acknowledged, not on disk: {sorted(lost)}"
    assert on_node1, "node1 took no mail before its stop: the stop proved nothing"
    assert senders.tokens(opened_after=gone) <= on_node2
    measured["during the stop: acknowledged, on node1, not acknowledged"] = (
        len(acknowledged), len(on_node1), len(senders.failures))
    measured["failures seen by the senders"] = senders.failures[:5]

    # Prometheus and HAProxy see node1 gone; the alert is on its way.
    wait_until(lambda: prometheus.alerts("SmtpdNodeDown").keys() == {"node1"},
               timeout=120, interval=0.5, what="SmtpdNodeDown for node1")
    wait_until(lambda: prometheus.query('haproxy_server_status{state="DOWN"} == 1').keys() == {"node1"},
               timeout=120, interval=0.5, what="HAProxy to take node1 out")

    # More mails after the stop: all of them on node2.
    smtp_source(haproxy.port, 300, "after")
    assert complete_mails([node1, node2], "after") == {node1: 0, node2: 300}
    print(f"\nfleet measured: {measured}")
