"""edge-gateway.service, in flow order: acquire (sources), intake (the one sink), calibrate,
pipeline (calibrate, validate, alarms), buffer, forward; settings and daemon wire them."""
