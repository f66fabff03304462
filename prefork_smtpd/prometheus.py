"""Prometheus text exposition of the shared counters, rendered by the master.

A custom collector reads the shared block at scrape time, so the figures
are the same ones XSTAT gives (not prometheus-client's multiprocess files).
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .diskspace import free_bytes
from .stats import FIELD, SharedStats


class SharedStatsCollector:
    def __init__(
        self, stats: SharedStats, live_workers: Callable[[], list[int]], mail_dir: Callable[[], str],
        free: Callable[[str], int | None] = free_bytes,
    ) -> None:
        self.stats = stats
        self.live_workers = live_workers  # slot indices of running workers
        self.mail_dir = mail_dir  # read at each scrape: a reload may move it
        self.free = free

    def collect(self) -> Iterable[Metric]:
        t = self.stats.totals()
        yield CounterMetricFamily("smtpd_connections", "SMTP connections accepted", value=t.total)
        yield GaugeMetricFamily("smtpd_connections_current", "SMTP connections open now", value=t.current)
        yield CounterMetricFamily("smtpd_received_bytes", "Message bytes accepted", value=t.bytes)
        yield CounterMetricFamily("smtpd_mails", "Messages accepted and stored", value=t.mails)
        yield CounterMetricFamily(
            "smtpd_connections_refused", "Connections closed at once with 421 (over a limit)",
            value=t.rejected_connections,
        )
        yield CounterMetricFamily(
            "smtpd_tls_handshake_failures", "TLS handshakes that failed or timed out", value=t.tls_handshake_failures,
        )
        yield CounterMetricFamily("smtpd_auth_failures", "AUTH attempts with a wrong name or password", value=t.auth_failures)
        yield GaugeMetricFamily(
            "smtpd_connections_proxied", "SMTP connections open now that came through a trusted proxy",
            value=t.proxied,
        )
        yield CounterMetricFamily(
            "smtpd_proxy_failures",
            "Connections to a PROXY protocol port closed before a session: untrusted peer, bad or late header",
            value=t.proxy_failures,
        )
        tls = CounterMetricFamily(
            "smtpd_tls_sessions", "TLS handshakes completed (STARTTLS and implicit TLS), by version", labels=["version"],
        )
        for version, count in self.stats.tls_sessions().items():
            tls.add_metric([version], count)
        yield tls
        auth = CounterMetricFamily(
            "smtpd_auth_attempts", "AUTH exchanges by mechanism and result", labels=["mechanism", "result"],
        )
        for (mechanism, result), count in self.stats.auth_attempts().items():
            auth.add_metric([mechanism, result], count)
        yield auth
        rejected = CounterMetricFamily("smtpd_rejected_replies", "Error replies sent, by class", labels=["class"])
        rejected.add_metric(["4xx"], t.replies_4xx)
        rejected.add_metric(["5xx"], t.replies_5xx)
        yield rejected
        runner = self.stats.slot(0)  # the queue runner's (runner.RUNNER_SLOT)
        yield GaugeMetricFamily("smtpd_queue_messages", "Mails in the outbound queue", value=runner.get(FIELD["queue_messages"]))
        yield GaugeMetricFamily(
            "smtpd_queue_oldest_seconds", "Age of the oldest queued mail", value=runner.get(FIELD["queue_oldest_seconds"]),
        )
        deliveries = CounterMetricFamily("smtpd_deliveries", "Outbound recipient deliveries, by result", labels=["result"])
        deliveries.add_metric(["sent"], t.deliveries_sent)
        deliveries.add_metric(["deferred"], t.deliveries_deferred)
        deliveries.add_metric(["bounced"], t.deliveries_bounced)
        yield deliveries
        yield CounterMetricFamily(
            "smtpd_log_lines_dropped", "Log lines dropped because the log could not be written fast enough",
            value=t.log_lines_dropped,
        )
        workers = self.live_workers()
        yield GaugeMetricFamily("smtpd_workers", "Worker processes running", value=len(workers))
        current = GaugeMetricFamily("smtpd_worker_connections", "Connections open per worker", labels=["worker"])
        restarts = CounterMetricFamily("smtpd_worker_restarts", "Times a worker slot was refilled", labels=["worker"])
        for index in workers:
            slot = self.stats.slot(index)
            current.add_metric([str(index)], slot.get(FIELD["current"]))
            restarts.add_metric([str(index)], slot.get(FIELD["restarts"]))
        yield current
        yield restarts
        yield from self.disk_reserve()

    def disk_reserve(self) -> Iterable[Metric]:
        """The free space on the store and the reserve --min-free-space keeps.

        The workers refuse mail with 452 once accepting it would leave less
        than the reserve free, so ``free < reserve`` means the node takes no
        more mail: an alert can say so before the senders' queues do. The
        free space is the same statvfs figure the workers check (what an
        unprivileged writer may use); it is left out when it cannot be read.
        """
        yield GaugeMetricFamily(
            "smtpd_min_free_space_bytes", "Free space kept on the mail store (--min-free-space), 0 for no check",
            value=self.stats.get("min_free_space"),
        )
        free = self.free(self.mail_dir())
        if free is not None:
            yield GaugeMetricFamily(
                "smtpd_mail_dir_free_bytes", "Free space on the mail store's file system, as the workers see it",
                value=free,
            )


def make_renderer(
    stats: SharedStats, live_workers: Callable[[], list[int]], mail_dir: Callable[[], str],
) -> Callable[[], tuple[bytes, str]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SharedStatsCollector(stats, live_workers, mail_dir))
    return lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)
