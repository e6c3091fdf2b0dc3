"""Edge gateway and central processor for wastewater treatment plant probes."""

__version__ = "0.1.0"
