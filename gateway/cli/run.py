"""``edge-gateway run``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from gateway.common.config import ConfigError
from gateway.common.logs import configure_logging

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="The gateway's config file.")]


def run(
    config: ConfigPath = Path("config.toml"),
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the edge gateway daemon until SIGTERM or Ctrl-C; SIGHUP reloads the config."""
    from gateway.edge.daemon import run_until_signalled

    run_daemon(run_until_signalled, config, log_level, "edge-gateway")


def run_daemon(
    run_until_signalled: Callable[[Path], None], config: Path, log_level: str, name: str
) -> None:
    """Run a daemon's signal loop: exit 2 on a config error, 1 when a stage thread died."""
    from gateway.common.supervise import StageDied

    configure_logging(log_level)
    try:
        run_until_signalled(config)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    except StageDied as e:
        typer.echo(f"{name} stopped: {e}", err=True)
        raise typer.Exit(1) from None
