"""Modbus RTU and TCP: framing (frames), transports (transport), register decoding (registers),
probe profiles from drivers/*.toml (profiles), the polling engine (engine) and the probe
simulator (simulate)."""
