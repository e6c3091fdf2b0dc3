# shellcheck shell=bash
# Shared helpers for scripts/services. Sourced, never run.
# Each service file services.d/<name>.sh defines <name>_install, <name>_up, <name>_down and
# <name>_status; <name>_up writes the variables its clients need to $VAR/<name>/env.

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
VAR=${EDGE_VAR:-$ROOT/var}
# CACHE and CERTS are for the service files that source this one.
# shellcheck disable=SC2034
{
  CACHE=${EDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-gateway}
  CERTS=$VAR/certs
}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

# wait_port HOST PORT SECONDS: wait until a TCP port accepts connections.
wait_port() {
  local host=$1 port=$2 secs=${3:-60} i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# port_free PORT: true when nothing listens on 127.0.0.1:PORT.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pidfile() { echo "$VAR/$1/pid"; }

is_running() {
  local pf; pf=$(pidfile "$1")
  [[ -f $pf ]] && kill -0 "$(cat "$pf")" 2>/dev/null
}

# start_daemon NAME CMD...: run CMD in its own session, log to $VAR/NAME/NAME.log.
start_daemon() {
  local name=$1; shift
  mkdir -p "$VAR/$name"
  setsid nohup "$@" >>"$VAR/$name/$name.log" 2>&1 < /dev/null &
  echo $! >"$(pidfile "$name")"
}

# stop_daemon NAME [SECONDS]: SIGTERM the daemon's process group, SIGKILL after SECONDS.
stop_daemon() {
  local name=$1 secs=${2:-20} pf pid i
  pf=$(pidfile "$name")
  [[ -f $pf ]] || return 0
  pid=$(cat "$pf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop in ${secs}s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pf"
}

status_line() {
  if is_running "$1"; then echo "$1: running (pid $(cat "$(pidfile "$1")"))"; else echo "$1: stopped"; fi
}

# apt_ensure PKG...: install Debian packages that are missing.
apt_ensure() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
