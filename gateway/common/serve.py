"""The daemons' own process: ``edge-gateway run`` and ``edge-gateway processor run`` parse their
options with the CLI, then exec ``python -m gateway.common.serve NAME CONFIG LEVEL``.

The long-running process then holds only what it runs. Through the CLI it also held every command
module, typer, rich and pydantic (typer 0.29 validates options with it): about 10 MB of the edge
gateway's RSS, measured with ``scripts/bench gateway_rss``. exec keeps the pid, the environment and
the open descriptors, so systemd's notify socket, watchdog and MAINPID are unchanged.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

# The module with each daemon's run_until_signalled(config_path), by the name it reports as.
DAEMONS = {"edge-gateway": "gateway.edge.daemon", "edge-processor": "gateway.processor.service"}


def exec_daemon(name: str, config: Path, log_level: str) -> NoReturn:
    """Replace this (CLI) process by the daemon ``name`` (a key of DAEMONS)."""
    if name not in DAEMONS:
        raise ValueError(f"unknown daemon {name!r}; known: {', '.join(DAEMONS)}")
    sys.stdout.flush()
    sys.stderr.flush()
    python = sys.executable
    os.execv(python, [python, "-m", __name__, name, str(config), log_level])


def serve(name: str, config: str, log_level: str) -> int:
    """Run the daemon ``name`` until it is signalled; the exit code: 2 for a config error, 1 when
    a stage thread died, 0 after a stop."""
    from gateway.common.config import ConfigError
    from gateway.common.logs import configure_logging
    from gateway.common.supervise import StageDied

    run_until_signalled = importlib.import_module(DAEMONS[name]).run_until_signalled
    configure_logging(log_level)
    try:
        run_until_signalled(Path(config))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except StageDied as e:
        print(f"{name} stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve(*sys.argv[1:4]))
