"""edge-processor.service, stage by stage: consume raw readings (consume, codec), commit their
offsets only once stored (checkpoint), aggregate them into 1-minute windows (aggregate), publish
validated copies and alerts (publish), store in InfluxDB (store, through the writer thread in
writer), set InfluxDB up (provision), read it back (query); settings and service wire them."""
