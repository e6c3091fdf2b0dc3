"""``edge-gateway ml serve``: the built-in reusability estimator as an ML API.

It answers ``POST /api/predict/reusability`` with the design's contract, so a site can point
``ML_API_URL`` at it, or replace it with its own model behind the same contract.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from typer import Option

from gateway.common.config import ConfigError

app = typer.Typer(help="The reusability model's ML API.", no_args_is_help=True)

DEFAULT_PORT = 9182


@app.command()
def serve(
    host: Annotated[str, Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, Option(min=1, max=65535, help="TCP port.")] = DEFAULT_PORT,
    config: Annotated[
        Path | None,
        Option("--config", "-c", help="Config file whose [ml] removal and limits to use."),
    ] = None,
    log_level: Annotated[str, Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve the built-in estimator over HTTP until SIGTERM or Ctrl-C."""
    from aiohttp import web

    from gateway.processor.estimator import EstimatorConfig
    from gateway.processor.mlapi import PATH, make_app
    from gateway.processor.settings import load_ml_config

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    estimator: EstimatorConfig = EstimatorConfig()
    if config is not None:
        try:
            estimator = load_ml_config(config)
        except ConfigError as e:
            typer.echo(f"config error: {e}", err=True)
            raise typer.Exit(2) from None
    logging.getLogger(__name__).info("ML API on http://%s:%d%s", host, port, PATH)
    try:
        web.run_app(make_app(estimator), host=host, port=port, print=None, access_log=None)
    except OSError as e:
        typer.echo(f"cannot listen on {host}:{port}: {e.strerror or e}", err=True)
        raise typer.Exit(1) from None
