"""Prometheus metrics for both services, on a registry the caller owns.

Names in the first block are the design's contract; keep them. Each service builds one ``Metrics``
with its own ``CollectorRegistry`` and passes it to the stages, so tests can run several services in
one process without their counters colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # The design's contract.
        self.messages_received = Counter(
            "iot_messages_received_total", "Readings received", ["source", "plant_id"], registry=r
        )
        self.messages_processed = Counter(
            "iot_messages_processed_total",
            "Readings processed, by outcome",
            ["status", "plant_id"],
            registry=r,
        )
        self.alerts_triggered = Counter(
            "iot_alerts_triggered_total", "Alarm events raised", ["level", "parameter"], registry=r
        )
        self.processing_latency = Histogram(
            "iot_processing_latency_seconds",
            "Time spent per stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_connections = Gauge(
            "iot_active_connections",
            "Connections that are up: probes and brokers (gateway), WebSocket clients (processor)",
            registry=r,
        )
        self.buffer_size = Gauge(
            "iot_buffer_size", "Rows waiting in the disk buffer", ["plant_id"], registry=r
        )
        # What operators need besides.
        self.buffer_bytes = Gauge("iot_buffer_bytes", "Size of the disk buffer file", registry=r)
        self.buffer_oldest_age = Gauge(
            "iot_buffer_oldest_age_seconds", "Age of the oldest undelivered row", registry=r
        )
        self.buffer_dropped = Counter(
            "iot_buffer_dropped_total",
            "Rows dropped by the overflow policy",
            ["reason"],
            registry=r,
        )
        self.modbus_errors = Counter(
            "iot_modbus_errors_total",
            "Modbus transport and decode errors",
            ["port", "unit", "kind"],
            registry=r,
        )
        self.modbus_requests = Counter(
            "iot_modbus_requests_total", "Modbus read requests sent", ["port"], registry=r
        )
        self.redeliveries = Counter(
            "iot_redeliveries_total",
            "Deliveries recognised as already committed: acknowledged again, not stored again",
            ["source"],
            registry=r,
        )
        self.rejected_payloads = Counter(
            "iot_rejected_payloads_total",
            "Payloads that could not become readings (dead-lettered)",
            ["source", "reason"],
            registry=r,
        )
        self.kafka_delivered = Counter(
            "iot_kafka_delivered_total", "Records confirmed by Kafka", ["topic"], registry=r
        )
        self.kafka_delivery_failures = Counter(
            "iot_kafka_delivery_failures_total",
            "Kafka delivery reports with an error",
            ["reason"],
            registry=r,
        )
        self.kafka_dead_lettered = Counter(
            "iot_kafka_dead_lettered_total",
            "Buffer rows Kafka refused for good, moved to the dead-letter store",
            ["reason"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "iot_delivery_latency_seconds",
            "From buffer commit to Kafka confirmation",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300),
            registry=r,
        )
        self.consumer_lag = Gauge(
            "iot_consumer_lag",
            "Messages behind the partition end",
            ["topic", "partition"],
            registry=r,
        )
        self.influx_write_failures = Counter(
            "iot_influxdb_write_failures_total", "InfluxDB batch writes that failed", registry=r
        )
        self.late_rollups = Counter(
            "iot_late_rollups_total",
            "Hours and days of a plant downsampled again because windows came after the task",
            ["bucket"],
            registry=r,
        )
        self.influx_refused_lines = Counter(
            "iot_influxdb_refused_lines_total",
            "Lines InfluxDB refused for good, each sent to the dead-letter topic",
            ["bucket", "reason"],
            registry=r,
        )
        self.late_readings = Counter(
            "iot_late_readings_total",
            "Readings too late for their window",
            ["plant_id"],
            registry=r,
        )
        self.duplicate_readings = Counter(
            "iot_duplicate_readings_total",
            "Re-sent readings already counted in their open window",
            ["plant_id"],
            registry=r,
        )
        self.predictions = Counter(
            "iot_predictions_total",
            "Reusability predictions made, by the model that made them",
            ["plant_id", "model"],
            registry=r,
        )
        self.ml_api_failures = Counter(
            "iot_ml_api_failures_total",
            "Calls to the ML API that failed (the built-in estimator answered)",
            ["reason"],
            registry=r,
        )
        self.ml_breaker_open = Gauge(
            "iot_ml_breaker_open", "1 while the ML API's circuit breaker is open", registry=r
        )
        self.notifications_sent = Counter(
            "iot_notifications_sent_total", "Notifications delivered, by channel", ["channel"],
            registry=r,
        )  # fmt: skip
        self.notifications_failed = Counter(
            "iot_notifications_failed_total",
            "Notification attempts that failed (retried until given up), by channel",
            ["channel"],
            registry=r,
        )
        self.notification_queue = Gauge(
            "iot_notification_queue_depth", "Notifications waiting to be sent, by channel",
            ["channel"], registry=r,
        )  # fmt: skip
        self.notification_oldest_age = Gauge(
            "iot_notification_oldest_unsent_seconds",
            "Age of the oldest notification not yet sent (0 when none waits)",
            registry=r,
        )
