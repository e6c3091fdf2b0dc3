"""``edge-gateway processor``: run the central processor, provision InfluxDB."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer import Option

from gateway.common.config import ConfigError
from gateway.common.serve import exec_daemon

if TYPE_CHECKING:  # the service pulls in Kafka and InfluxDB clients: import them only when used
    from gateway.processor.settings import ProcessorSettings

app = typer.Typer(help="The central processor (edge-processor.service).", no_args_is_help=True)

ConfigOption = Annotated[
    Path, Option("--config", "-c", envvar="EDGE_GATEWAY_CONFIG", help="Config file (TOML).")
]


def _load(config: Path) -> ProcessorSettings:
    from gateway.processor.settings import load_processor_config

    try:
        return load_processor_config(config)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigOption = Path("config.toml"),
    log_level: Annotated[str, Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Consume raw readings until SIGTERM or Ctrl-C: validate, alarm, aggregate, store."""
    exec_daemon("edge-processor", config, log_level)


@app.command("setup-influx")
def setup_influx(config: ConfigOption = Path("config.toml")) -> None:
    """Create or correct the InfluxDB buckets and downsampling tasks (safe to run again)."""
    from gateway.processor.provision import provision

    settings = _load(config)
    try:
        client = settings.influxdb.client(settings.source)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        for line in provision(client, settings.influxdb):
            typer.echo(line)
    except Exception as e:
        typer.echo(f"setup-influx failed: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
