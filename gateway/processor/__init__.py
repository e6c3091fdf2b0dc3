"""The central processor (edge-processor.service), stage by stage: consume raw readings, aggregate
them into 1-minute windows, store them in InfluxDB, set InfluxDB up, query it back, and the
service that wires these together."""
