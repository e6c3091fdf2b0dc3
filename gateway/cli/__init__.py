"""The ``edge-gateway`` command: run either service, and the tools around them.

Each group of commands lives in its own module here and is registered below.
"""

from __future__ import annotations

import typer

from gateway import __version__

app = typer.Typer(
    name="edge-gateway",
    help="Edge gateway for wastewater treatment plant probes, and its central processor.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edge-gateway {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Edge gateway for wastewater treatment plant probes, and its central processor."""


def main() -> None:
    app()


# Command groups register themselves on ``app`` here, after it exists.
from gateway.cli import alerts, calibrate, ml, processor, query, run, simulate  # noqa: E402

app.add_typer(calibrate.app, name="calibrate")
app.command("simulate")(simulate.simulate)
app.add_typer(processor.app, name="processor")
app.add_typer(query.app, name="query")
app.add_typer(ml.app, name="ml")
app.add_typer(alerts.app, name="alerts")
app.command("run")(run.run)
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
config_app.command("check")(run.check)
app.add_typer(config_app, name="config")

from gateway.cli import init  # noqa: E402

app.command("init")(init.init)
