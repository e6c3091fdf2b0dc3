# shellcheck shell=bash
# Eclipse Mosquitto from Debian, with auth on, anonymous off, a plain and a TLS listener.

MQTT_PORT=${MQTT_PORT:-11883}
MQTT_TLS_PORT=${MQTT_TLS_PORT:-18883}
MQTT_USERNAME=edge

mosquitto_install() { command -v mosquitto >/dev/null || apt_ensure mosquitto mosquitto-clients; }

mosquitto_up() {
  local dir=$VAR/mosquitto
  mkdir -p "$dir/data"
  [[ -f $dir/password ]] || head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$dir/password"
  local pw; pw=$(cat "$dir/password")
  if ! is_running mosquitto; then
    : >"$dir/passwd"
    chmod 600 "$dir/passwd"
    mosquitto_passwd -b "$dir/passwd" "$MQTT_USERNAME" "$pw"
    cat >"$dir/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous false
password_file $dir/passwd
persistence true
persistence_location $dir/data/
log_dest stderr
log_type error
log_type warning
log_type notice
max_inflight_messages 1000
max_queued_messages 1000000
listener $MQTT_PORT 127.0.0.1
listener $MQTT_TLS_PORT 127.0.0.1
cafile $CERTS/ca.pem
certfile $CERTS/server.pem
keyfile $CERTS/server.key
CONF
    # Run as root, mosquitto would switch to its own user, who cannot read var/; stay as we are.
    [[ $(id -u) == 0 ]] && echo "user root" >>"$dir/mosquitto.conf"
    start_daemon mosquitto mosquitto -c "$dir/mosquitto.conf"
    wait_port 127.0.0.1 "$MQTT_PORT" 20 || die "mosquitto did not open port $MQTT_PORT (see $dir/mosquitto.log)"
    wait_port 127.0.0.1 "$MQTT_TLS_PORT" 20 || die "mosquitto did not open port $MQTT_TLS_PORT"
  fi
  cat >"$dir/env" <<ENV
MQTT_HOST=127.0.0.1
MQTT_PORT=$MQTT_PORT
MQTT_TLS_PORT=$MQTT_TLS_PORT
MQTT_USERNAME=$MQTT_USERNAME
MQTT_PASSWORD=$pw
MQTT_CA_FILE=$CERTS/ca.pem
ENV
}

mosquitto_down() { stop_daemon mosquitto 10; }
mosquitto_status() { status_line mosquitto; }
