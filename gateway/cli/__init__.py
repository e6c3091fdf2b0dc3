"""The ``edge-gateway`` command: run either service, and the tools around them.

Each group of commands lives in its own module here and is registered below.
"""

from __future__ import annotations

import typer

from gateway import __version__

EXIT_CODES = (
    "Exit codes (each command's --help says which it uses): 0 done / healthy / valid; 1 a check "
    "failed, nothing found, a calibration failed, or a question answered no; 2 bad option, "
    "config or profile; 3 a port, broker or gateway cannot be reached; 4 a live calibration was "
    "abandoned (a point not stable in time, the gateway failed)."
)

app = typer.Typer(
    name="edge-gateway",
    help="Edge gateway for wastewater treatment plant probes, and its central processor.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=True,
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
from gateway.cli import (  # noqa: E402
    alerts,
    calibrate,
    configcheck,
    ml,
    processor,
    query,
    run,
    simulate,
)

app.add_typer(calibrate.app, name="calibrate")
app.command("simulate")(simulate.simulate)
app.add_typer(processor.app, name="processor")
app.add_typer(query.app, name="query")
app.add_typer(ml.app, name="ml")
app.add_typer(alerts.app, name="alerts")
app.command("run")(run.run)
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
config_app.command("check")(configcheck.check)
app.add_typer(config_app, name="config")

from gateway.cli import init  # noqa: E402

app.command("init")(init.init)

from gateway.cli import buffer, deadletter, diag  # noqa: E402

app.add_typer(diag.app, name="diag")
app.add_typer(buffer.app, name="buffer")
app.add_typer(deadletter.app, name="deadletter")
