# shellcheck shell=bash
# Telegraf (a peer for scripts/bench --peers, not a service the gateway needs), built from its Go
# module with only the plugins the bench runs. Sourced after common.sh; `telegraf_install` prints
# the binary's path.
#
#   go mod download -json github.com/influxdata/telegraf@v1.37.2      # -> module cache
#   cp -r $(go env GOMODCACHE)/github.com/influxdata/telegraf@v1.37.2 $WORK/src; chmod -R u+w $WORK/src
#   cd $WORK/src && CGO_ENABLED=0 go build -tags "$TELEGRAF_TAGS" -trimpath \
#     -ldflags "-s -w -X github.com/influxdata/telegraf/internal.Version=1.37.2" ./cmd/telegraf
#
# The `custom` tag leaves out every plugin not named by its own tag. The binary is cached beside
# the InfluxDB build, in $CACHE/telegraf-<ver>/telegraf; the scratch tree is removed after a good
# build.

TELEGRAF_VERSION=${TELEGRAF_VERSION:-v1.37.2}
TELEGRAF_TAGS=custom,inputs.mqtt_consumer,inputs.modbus,outputs.kafka,parsers.json_v2,serializers.json

telegraf_home() { echo "$CACHE/telegraf-${TELEGRAF_VERSION#v}"; }
telegraf_bin() { echo "$(telegraf_home)/telegraf"; }

telegraf_install() {
  local bin go home work started
  bin=$(telegraf_bin)
  if [[ -x $bin ]]; then
    echo "$bin"
    return 0
  fi
  go=$(command -v go 2>/dev/null || true)
  [[ -n $go ]] || { [[ -x /usr/local/go/bin/go ]] && go=/usr/local/go/bin/go; }
  [[ -n $go ]] || die "go is not installed (need Go >= 1.24)"
  home=$(telegraf_home)
  work=$home/build
  started=$SECONDS
  mkdir -p "$work"
  log "building telegraf $TELEGRAF_VERSION ($TELEGRAF_TAGS) in $work"
  (
    export GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOCACHE=$work/gocache
    cd "$work" || exit 1
    dir=$("$go" mod download -json "github.com/influxdata/telegraf@$TELEGRAF_VERSION" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -d $dir ]] || { log "go mod download of telegraf $TELEGRAF_VERSION failed"; exit 1; }
    rm -rf "$work/src" && cp -r "$dir" "$work/src" && chmod -R u+w "$work/src" &&
      cd "$work/src" || exit 1
    "$go" build -tags "$TELEGRAF_TAGS" -trimpath -o "$work/telegraf" \
      -ldflags "-s -w -X github.com/influxdata/telegraf/internal.Version=${TELEGRAF_VERSION#v}" \
      ./cmd/telegraf >&2 || exit 1
  ) || die "telegraf build failed (scratch tree kept in $work)"
  install -m 0755 "$work/telegraf" "$bin.tmp"
  mv -f "$bin.tmp" "$bin"
  chmod -R u+w "$work" 2>/dev/null || true
  rm -rf "$work"
  log "built $bin in $((SECONDS - started))s"
  echo "$bin"
}
