# shellcheck shell=bash
# socat makes the pseudo-terminal pairs that carry Modbus RTU frames to simulated probes. Nothing
# runs until a test or the demo asks for a pair.

socat_install() { command -v socat >/dev/null || apt_ensure socat; }
socat_up() { :; }
socat_down() { :; }
socat_status() { command -v socat >/dev/null && echo "socat: installed" || echo "socat: missing"; }
