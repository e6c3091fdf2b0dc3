"""``edge-gateway run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.common.serve import exec_daemon

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="The gateway's config file.")]


def run(
    config: ConfigPath = Path("config.toml"),
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the edge gateway daemon until SIGTERM or Ctrl-C; SIGHUP reloads the config. Exit code
    2 for a config error, 1 when a stage thread died."""
    exec_daemon("edge-gateway", config, log_level)
