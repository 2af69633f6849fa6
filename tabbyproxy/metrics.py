"""
Prometheus metrics for C{GET /metrics}: requests by route, model and status; requests in flight
and waiting; model starts, stops, failed starts and crashes; load time, time to first byte and
request duration as histograms; chunks relayed; and the loaded model as a labelled gauge.

The proxy's parts report what happens through the small L{Metrics} methods; the live state
(in flight, waiting, which model runs) is read from the scheduler when Prometheus scrapes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Model loads take seconds to minutes; requests from milliseconds to minutes.
_LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@frozen
class RequestSeries:
    """
    The metric series one kind of request (its route, model and status) is counted in, found
    once: C{labels()} hashes and locks on every call, and every request ends in one of a few.
    """

    requests: Any
    seconds: Any
    # None for a request no model was named for: those have no such series.
    firstByte: Any | None
    chunks: Any | None


class Metrics:
    """
    The proxy's metrics, in a registry of their own (so tests and several proxies in one process
    never share counters).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tabbyproxy_requests", "Requests answered, by route, model and HTTP status.",
            ["route", "model", "status"], registry=self.registry,
        )
        self.requestSeconds = Histogram(
            "tabbyproxy_request_duration_seconds", "Time from a request's arrival to its last byte.",
            ["route", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.firstByteSeconds = Histogram(
            "tabbyproxy_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte of TabbyAPI's answer (the first token "
            "of a stream), waiting for the model included.",
            ["route", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.chunks = Counter(
            "tabbyproxy_stream_chunks_relayed", "Streamed events (about one per token) relayed to clients.",
            ["model"], registry=self.registry,
        )
        self.starts = Counter("tabbyproxy_model_starts", "TabbyAPI starts, by model.", ["model"],
                              registry=self.registry)
        self.stops = Counter("tabbyproxy_model_stops", "TabbyAPI stops the proxy asked for, by model and reason.",
                             ["model", "reason"], registry=self.registry)
        self.failedStarts = Counter("tabbyproxy_model_failed_starts", "Starts that never became ready.",
                                    ["model"], registry=self.registry)
        self.crashes = Counter("tabbyproxy_model_crashes", "TabbyAPI exits nobody asked for, by model.",
                               ["model"], registry=self.registry)
        self.loadSeconds = Histogram(
            "tabbyproxy_model_load_seconds", "Time from spawning TabbyAPI to its first healthy answer.",
            ["model"], buckets=_LOAD_BUCKETS, registry=self.registry,
        )
        # As many as prometheus_client keeps children for: one per route, model and status seen.
        self._series: dict[tuple[str, str, int], RequestSeries] = {}

    def forRequest(self, route: str, model: str, status: int) -> RequestSeries:
        """
        The series a request of C{route} for C{model} (C{""} when none) that ended with C{status}
        is counted in.
        """
        key = (route, model, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = RequestSeries(
                self.requests.labels(route, model, str(status)),
                self.requestSeconds.labels(route, model),
                self.firstByteSeconds.labels(route, model) if model else None,
                self.chunks.labels(model) if model else None,
            )
        return series

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """
        Report the scheduler's live state at each scrape.

        @param state: returns the scheduler's status document.
        """
        self.registry.register(_LiveState(state))


class _LiveState(Collector):
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        status = self.state()
        inFlight = GaugeMetricFamily("tabbyproxy_requests_in_flight", "Requests being served by TabbyAPI now.")
        inFlight.add_metric([], status["in_flight"])
        waiting = GaugeMetricFamily("tabbyproxy_requests_waiting", "Requests waiting for a model.")
        waiting.add_metric([], status["waiting"])
        loaded = GaugeMetricFamily(
            "tabbyproxy_model_loaded", "1 for each model TabbyAPI runs now, with its state.", labels=["model", "state"]
        )
        memory = GaugeMetricFamily(
            "tabbyproxy_model_memory_bytes",
            "The GPU memory accounted to each running model, by GPU (measured once ready where nvidia-smi can).",
            labels=["model", "gpu"],
        )
        for child in status["children"]:
            loaded.add_metric([child["model"], child["state"]], 1)
            for gpu, size in child["memory"]["accounted"].items():
                memory.add_metric([child["model"], gpu], size)
        gpuAccounted = GaugeMetricFamily(
            "tabbyproxy_gpu_accounted_bytes", "The GPU memory accounted to the running models, by GPU.", labels=["gpu"]
        )
        gpuCapacity = GaugeMetricFamily(
            "tabbyproxy_gpu_capacity_bytes", "The GPU memory the models may use, by GPU.", labels=["gpu"]
        )
        for gpu in status["gpus"] or ():
            gpuAccounted.add_metric([str(gpu["index"])], gpu["accounted_bytes"])
            gpuCapacity.add_metric([str(gpu["index"])], gpu["capacity_bytes"])
        return [inFlight, waiting, loaded, memory, gpuAccounted, gpuCapacity]
