"""The dashboard's figures in Prometheus's exposition format, built with ``prometheus_client``.

Each scrape builds a fresh ``CollectorRegistry`` holding one collector over
figures read a moment before (:func:`exposition`), so nothing is added to
the process's global registry: a project that already exports its own
metrics with django-prometheus (which serves ``REGISTRY``) sees no duplicate
series, and our series never go stale in a worker that has not been scraped.

Every series is prefixed ``clustershm_``. Per namespace: the label
``namespace`` ("" is the shared store, else the cache's LOCATION). Per
process: ``pid`` and ``role`` (manager, worker or process). Lock keys are
not labels: their number is unbounded (a key per user, per order...), and
a label per key would grow Prometheus's series without end.

The near cache's hits and misses are those of the worker that answered the
scrape (a process knows only its own): ``pid`` says which.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

PREFIX = "clustershm_"


class FiguresCollector(Collector):
    """The metrics of one set of figures (see :mod:`.figures`); None: the engine did not answer."""

    def __init__(self, figures: dict[str, Any] | None) -> None:
        self.figures = figures

    def describe(self) -> list[Metric]:
        return []  # no names to check at registration: the registry is this scrape's alone

    def collect(self) -> Iterator[Metric]:
        figures = self.figures
        up = GaugeMetricFamily(PREFIX + "up", "1 if the engine answered this scrape, else 0")
        up.add_metric([], 0 if figures is None else 1)
        yield up
        if figures is None:
            return
        info = InfoMetricFamily(PREFIX + "engine", "The engine in use and what it guarantees")
        info.add_metric([], {"engine": str(figures["engine"]), **_guarantees(figures["capabilities"])})
        yield info
        if figures["manager"] is not None:
            yield from _manager(figures)
        if figures["remote"] is not None:
            yield from _remote(figures["remote"])
        yield from _namespaces(figures["namespaces"])
        yield from _locks(figures["locks"])
        yield from _listeners_and_near(figures)


def _guarantees(capabilities: dict) -> dict[str, str]:
    return {name: str(value) for name, value in capabilities.items() if name != "engine"}


def _gauge(name: str, doc: str, value, labels: list[str] | None = None) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    if value is not None and labels is None:
        metric.add_metric([], value)
    return metric


def _counter(name: str, doc: str, value, labels: list[str] | None = None) -> CounterMetricFamily:
    metric = CounterMetricFamily(PREFIX + name, doc, labels=labels)
    if value is not None and labels is None:
        metric.add_metric([], value)
    return metric


def _manager(figures: dict) -> Iterator[Metric]:
    manager = figures["manager"]
    yield _gauge("manager_uptime_seconds", "Seconds since the Manager started", manager["uptime"])
    yield _counter("ops", "Requests the Manager answered", manager["ops"])
    yield _gauge("ops_per_second", "Requests the Manager answered in the last whole second", manager["ops_per_second"])
    yield _gauge("connections", "Connections open to the Manager", manager["connections"])
    if manager["recent_max_stall_ms"] is not None:
        yield _gauge(
            "loop_recent_max_stall_seconds",
            "The Manager loop's longest round over the last minute or so",
            manager["recent_max_stall_ms"] / 1000,
        )
    if manager["output_bytes"] is not None:
        yield _gauge("output_bytes", "Replies and pushes not yet sent, all clients together", manager["output_bytes"])
    yield _gauge("workers", "Worker processes connected (children of the Manager's process)", figures["workers"])
    labels = ["pid", "role"]
    connections = _gauge("process_connections", "Connections a process holds to the Manager", None, labels)
    ops = _counter("process_ops", "Requests of a process's open connections", None, labels)
    listeners = _gauge("process_listeners", "Listener subscriptions of a process", None, labels)
    near = _gauge("process_near_cache", "1 if a process reads through near caches", None, labels)
    for process in figures["processes"]:
        values = [str(process["pid"]), process["role"]]
        connections.add_metric(values, process["connections"])
        ops.add_metric(values, process["ops"])
        listeners.add_metric(values, process["listeners"])
        near.add_metric(values, 1 if process["near"] else 0)
    yield from (connections, ops, listeners, near)


def _remote(remote: dict) -> Iterator[Metric]:
    if remote.get("ops") is not None:
        yield _counter("ops", "Requests this process sent to the engine", remote["ops"])
    for name, key, doc in (
        ("server_used_memory_bytes", "used_memory", "Memory the server uses (INFO used_memory)"),
        ("server_maxmemory_bytes", "maxmemory", "The server's maxmemory (0: none)"),
        ("server_ops_per_second", "ops_per_second", "INFO instantaneous_ops_per_sec"),
        ("server_connected_clients", "connected_clients", "INFO connected_clients, all its users"),
    ):
        if remote.get(key) is not None:
            yield _gauge(name, doc, remote[key])
    for name, key, doc in (
        ("server_keyspace_hits", "keyspace_hits", "INFO keyspace_hits, all its users"),
        ("server_keyspace_misses", "keyspace_misses", "INFO keyspace_misses, all its users"),
    ):
        if remote.get(key) is not None:
            yield _counter(name, doc, remote[key])


def _namespaces(namespaces: list[dict]) -> Iterator[Metric]:
    labels = ["namespace"]
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "keys": _gauge("keys", "Keys in a namespace", None, labels),
        "bytes": _gauge("bytes", "Bytes a namespace counts against its budget", None, labels),
        "max_bytes": _gauge("max_bytes", "A namespace's budget in bytes", None, labels),
        "hits": _counter("hits", "Reads that found their key", None, labels),
        "misses": _counter("misses", "Reads that did not", None, labels),
        "evictions": _counter("evictions", "Keys a cache evicted to stay within its bounds", None, labels),
        "expired": _counter("expired", "Keys that expired", None, labels),
    }
    for space in namespaces:
        for field, family in families.items():
            if space.get(field) is not None:
                family.add_metric([space["name"]], space[field])
    yield from families.values()


def _locks(locks: dict) -> Iterator[Metric]:
    yield _gauge("locks_held", "Locks held", locks["held_count"])
    yield _gauge("lock_waiters", "Lock requests queued", locks["waiting"])
    yield _counter("locks_granted", "Locks granted", locks["granted"])
    yield _counter("lock_waits_timed_out", "Lock waits that ran out", locks["timed_out"])
    yield _counter("lock_leases_expired", "Locks freed because their lease ran out", locks["expired_leases"])
    waits = locks["current_waits"]
    if waits or locks["granted"] is not None:
        yield _gauge(
            "lock_longest_wait_seconds",
            "How long the longest current lock wait has waited so far (0: none waits)",
            waits[0]["waited"] if waits else 0,
        )


def _listeners_and_near(figures: dict) -> Iterator[Metric]:
    listeners = figures["listeners"]
    yield _gauge("listener_subscriptions", "Listener subscriptions, all processes", listeners["subscriptions"])
    yield _counter("listener_events_pushed", "Events pushed to listeners", listeners["pushed"])
    near = figures["near"]
    if near["fills"] is not None:
        yield _counter("near_fills", "Keys read by near-cache misses, all processes", near["fills"])
    if near["slots"] is not None:
        yield _gauge("near_slots", "Keys whose value the Manager keeps in a value slot", near["slots"])
        yield _counter("near_slot_writes", "Changes the Manager wrote into value slots", near["slot_writes"])
    labels = ["namespace", "pid"]
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "entries": _gauge("near_entries", "Entries in this process's near cache", None, labels),
        "bytes": _gauge("near_bytes", "Bytes in this process's near cache", None, labels),
        "hits": _counter("near_hits", "Reads this process's near cache answered", None, labels),
        "misses": _counter("near_misses", "Reads this process's near cache passed on", None, labels),
        "refreshed": _counter(
            "near_refreshed", "Stale copies this process refilled from value slots (in hits)", None, labels
        ),
        "declined": _counter(
            "near_declined", "Second reads kept no copy: the key changed since the first", None, labels
        ),
    }
    pid = str(figures["served_by"])
    for cache in near["here"]:
        for field, family in families.items():
            family.add_metric([cache["namespace"], pid], cache[field])
    yield from families.values()


def exposition(figures: dict[str, Any] | None, accept: str | None = None) -> tuple[bytes, str]:
    """``(body, content type)``: the text format, or OpenMetrics if ``accept`` asks for it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(figures))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
