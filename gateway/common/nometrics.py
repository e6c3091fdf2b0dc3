"""A :class:`~gateway.common.metrics.Metrics` stand-in for the ingest worker processes, whose
metrics nobody reads (the gateway's process counts what the workers send it and serves /metrics).
Every metric is a no-op, and prometheus_client is not imported: a worker is lighter by its
registry and the library (about 8 MB of RSS each)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from gateway.common.metrics import Metrics


class _NoMetric:
    """Counter, Gauge and Histogram at once, doing nothing."""

    def labels(self, *values: str, **labels: str) -> _NoMetric:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class _NoMetrics:
    _metric = _NoMetric()

    def __getattr__(self, name: str) -> _NoMetric:
        return self._metric


def no_metrics() -> Metrics:
    """Metrics that go nowhere, for a process whose metrics nobody reads."""
    return cast("Metrics", _NoMetrics())
