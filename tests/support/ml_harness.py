"""Shared by the prediction tests: ``edge-gateway ml serve`` as a real subprocess on a free port,
and the predictions read back from InfluxDB."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from influxdb_client import InfluxDBClient

from gateway.processor.store import PREDICTIONS_MEASUREMENT, InfluxConfig
from tests.support.net import free_port
from tests.support.services import ROOT
from tests.support.wait import wait_until


class MlServer:
    """``edge-gateway ml serve`` on 127.0.0.1; ``stop`` and ``start`` again keep the port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(json.load(resp).get("status") == "healthy")
        except OSError:
            return False

    def start(self) -> MlServer:
        self.starts += 1
        log = (self.workdir / f"ml-serve-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "ml", "serve", "--port", str(self.port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: self.healthy() or self.proc is None or self.proc.poll() is not None,
                30,
                "ml serve to answer /health",
                every=0.1,
            )
            assert self.proc.poll() is None, f"ml serve exited:\n{self.logs()}"
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-2000:] for p in sorted(self.workdir.glob("ml-serve-*"))
        )


PREDICTIONS_FLUX = """from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == measurement)
  |> filter(fn: (r) => contains(value: r.plant_id, set: plants))
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")"""


def stored_predictions(
    client: InfluxDBClient, cfg: InfluxConfig, plants: list[str], start: float, stop: float
) -> list[dict[str, Any]]:
    """The stored predictions of these plants between two times: one row each, in time order,
    with the tags (plant_id, model) and every field."""
    params = {
        "bucketName": cfg.bucket,
        "measurement": PREDICTIONS_MEASUREMENT,
        "rangeStart": datetime.fromtimestamp(start, UTC),
        "rangeStop": datetime.fromtimestamp(stop, UTC),
        "plants": plants,
    }
    tables = client.query_api().query(PREDICTIONS_FLUX, org=cfg.org, params=params)
    return sorted((rec.values for t in tables for rec in t.records), key=lambda v: v["_time"])
