"""One plant's simulated probes: the RS-485 bus on a pty and the Modbus TCP flow meter, following
the story (``story.py``). Run by the demo as a process of its own:

    python scripts/demolib/probes.py --port TTY --tcp 127.0.0.1:PORT --story-start EPOCH \
        [--polluted]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.edge.acquire.modbus.profiles import Profile, ValueSpec, load_profile  # noqa: E402
from gateway.edge.acquire.modbus.simulate import (  # noqa: E402
    RtuSimulator,
    SimBus,
    SimSlave,
    TcpSimulator,
)
from scripts.demolib.story import FLOW_METER, POLLUTED, PROBES, Probe, pollution  # noqa: E402


class StoryProbe(SimSlave):
    """A simulated probe whose values are scaled to where it sits and follow the story."""

    def __init__(self, profile: Profile, probe: Probe, start: float, polluted: bool) -> None:
        super().__init__(profile, probe.unit, scenario="noise", seed=probe.unit)
        self.probe, self.start, self.polluted = probe, start, polluted

    def _encode_value(self, v: ValueSpec, number: float) -> tuple[list[int], int]:
        if v.parameter in POLLUTED:
            number *= self.probe.scale
            if self.polluted:
                number *= pollution(self.probe.location, time.time() - self.start)
        return super()._encode_value(v, number)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", required=True, help="the probes' end of the pty pair")
    ap.add_argument("--tcp", required=True, help="host:port of the flow meter")
    ap.add_argument("--story-start", type=float, required=True, help="epoch seconds")
    ap.add_argument("--polluted", action="store_true", help="this plant gets the pollution event")
    args = ap.parse_args()
    drivers = ROOT / "drivers"

    def slave(p: Probe) -> StoryProbe:
        return StoryProbe(load_profile(drivers / p.profile), p, args.story_start, args.polluted)

    host, _, port = args.tcp.rpartition(":")
    rtu = RtuSimulator(args.port, SimBus([slave(p) for p in PROBES]))
    tcp = TcpSimulator(host, int(port), SimBus([slave(FLOW_METER)]))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with rtu, tcp:
        print(
            f"serving {len(PROBES)} probes on {args.port}, the flow meter on {args.tcp}", flush=True
        )
        done.wait()


if __name__ == "__main__":
    main()
