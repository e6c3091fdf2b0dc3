"""The ML API: its request/response contract, the client the processor calls it with (timeout and
circuit breaker), and the server ``edge-gateway ml serve`` runs with the built-in estimator.

Contract (DESIGN.md): ``POST {ML_API_URL}/api/predict/reusability`` with a JSON object of
``flow_rate, influent_BOD, influent_COD, influent_TSS, influent_pH, influent_TDS, temperature``
(numbers; a missing one takes the design's default) answers ``{"prediction": str, "confidence":
number 0..1}``. The processor also sends ``plant_id``, which a server may use (ours picks the
plant's removal settings) or ignore; our server also answers ``model``, ``effluent`` and
``defaulted``, which clients may ignore.

Both sides are aiohttp, the project's one HTTP stack.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from gateway.processor.estimator import INPUT_DEFAULTS, EstimatorConfig, estimate

PATH = "/api/predict/reusability"


class ContractError(ValueError):
    """A request or response that does not keep the contract."""


def _number(body: Mapping[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ContractError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def parse_request(body: Any) -> tuple[dict[str, float], list[str], str]:
    """The seven inputs (defaults filled in), the names that were defaulted, and the plant id."""
    if not isinstance(body, dict):
        raise ContractError(f"expected a JSON object, got {type(body).__name__}")
    inputs: dict[str, float] = {}
    defaulted: list[str] = []
    for name, default in INPUT_DEFAULTS.items():
        v = _number(body, name)
        if v is None:
            defaulted.append(name)
            v = default
        inputs[name] = v
    plant = body.get("plant_id", "")
    if not isinstance(plant, str) or len(plant) > 256:
        raise ContractError("plant_id must be a string of at most 256 characters")
    return inputs, defaulted, plant


def parse_response(body: Any) -> tuple[str, float]:
    if not isinstance(body, dict):
        raise ContractError(f"expected a JSON object, got {type(body).__name__}")
    prediction, confidence = body.get("prediction"), body.get("confidence")
    if not isinstance(prediction, str) or not prediction or len(prediction) > 256:
        raise ContractError(f"prediction must be a non-empty string, got {prediction!r}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not 0.0 <= confidence <= 1.0
    ):
        raise ContractError(f"confidence must be a number from 0 to 1, got {confidence!r}")
    return prediction, float(confidence)


# --- client -------------------------------------------------------------------------------------


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; after ``reset_seconds`` one call may probe
    (half-open): its success closes the circuit, its failure opens it for another cool-down.

    Used from one thread (the predictor's event loop); ``clock`` is injectable for tests.
    """

    def __init__(
        self, failures: int, reset_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.reset_seconds = reset_seconds
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May a call go out now? In half-open state only the one probe may."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.reset_seconds:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def success(self) -> None:
        self.state, self.failures = BreakerState.CLOSED, 0

    def failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state, self.opened_at = BreakerState.OPEN, self.clock()


class MlClient:
    """Calls a site's ML API. Create and use it inside one running event loop."""

    def __init__(self, base_url: str, timeout_seconds: float) -> None:
        self.url = base_url.rstrip("/") + PATH
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def predict(self, inputs: Mapping[str, float], plant_id: str) -> tuple[str, float]:
        """``(prediction, confidence)``; raises on a timeout, a refused connection, a non-200
        answer or one that breaks the contract."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = {**inputs, "plant_id": plant_id}
        async with self._session.post(self.url, json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                raise ContractError(f"ML API answered {resp.status}: {text}")
            try:
                answer = await resp.json(content_type=None)
            except ValueError as e:
                raise ContractError(f"ML API answer is not JSON: {e}") from None
        return parse_response(answer)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- server (edge-gateway ml serve) ---------------------------------------------------------------

MODEL = "builtin"


def make_app(config: EstimatorConfig) -> web.Application:
    """``POST /api/predict/reusability`` answered by the built-in estimator; ``GET /health``."""

    async def predict(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        try:
            inputs, defaulted, plant = parse_request(body)
            result = estimate(inputs, config, plant)
        except ContractError as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(
            {
                "prediction": result.prediction,
                "confidence": result.confidence,
                "model": MODEL,
                "effluent": result.effluent.to_dict(),
                "defaulted": defaulted,
            }
        )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "model": MODEL})

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post(PATH, predict)
    app.router.add_get("/health", health)
    return app
