# shellcheck shell=bash
# InfluxDB 2.7 OSS (influxd) built from source, for tests and the demo. Sourced after common.sh.
#
# Build recipe (what influxdb_install does on a clean machine; nothing but the Go module proxy,
# crates.io and Debian apt is needed):
#
#   apt-get install clang libclang-dev pkg-config protobuf-compiler build-essential
#   go mod download -json github.com/influxdata/influxdb/v2@v2.7.12       # -> module cache
#   cp -r $(go env GOMODCACHE)/github.com/influxdata/influxdb/v2@v2.7.12 $WORK/src; chmod -R u+w $WORK/src
#   cd $WORK/src
#   go build -o $WORK/bin/pkg-config github.com/influxdata/pkg-config     # InfluxData's wrapper, pinned by go.mod
#   PATH=$WORK/bin:$PATH PKG_CONFIG=$WORK/bin/pkg-config GOCACHE=$WORK/gocache CGO_ENABLED=1 \
#     go build -tags sqlite_foreign_keys,sqlite_json -trimpath \
#       -ldflags "-s -w -X main.version=v2.7.12 -X main.commit=modproxy" -o $WORK/influxd ./cmd/influxd
#   (plus RUSTC_WRAPPER=$WORK/bin/rustc-cap-lints, see below, so current rustc lints don't fail libflux)
#
# The wrapper answers cgo's `pkg-config flux` by copying the flux module (v0.196.1) from the module
# cache to $GOCACHE/pkgconfig and running `cargo build --release` in its libflux/ directory.
# The `assets` build tag is left out, so no UI is fetched or embedded (static/TODO.go stubs it).
# The binary ends up in $CACHE/influxdb-<ver>/influxd; the scratch tree is removed after a good
# build unless INFLUXDB_KEEP_BUILD=1.

INFLUXDB_VERSION=${INFLUXDB_VERSION:-v2.7.12}
INFLUXDB_HOST=127.0.0.1
INFLUXDB_PORT=${INFLUXDB_PORT:-18086}
INFLUXDB_URL=http://$INFLUXDB_HOST:$INFLUXDB_PORT
INFLUXDB_ORG=plant-ops
INFLUXDB_BUCKET=sensors
INFLUXDB_USER=edge
INFLUXDB_PASSWORD=${INFLUXDB_PASSWORD:-edge-dev-password}
INFLUXDB_DEV_TOKEN=${INFLUXDB_DEV_TOKEN:-edge-dev-token-6f1c2a9d4b7e}
# Rust toolchain for libflux; flux pins 1.72 in rust-toolchain.toml (with five cross targets);
# RUSTUP_TOOLCHAIN overrides that file.
INFLUXDB_RUST_TOOLCHAIN=${INFLUXDB_RUST_TOOLCHAIN:-stable}

influxdb_home() { echo "$CACHE/influxdb-${INFLUXDB_VERSION#v}"; }
influxdb_bin() { echo "$(influxdb_home)/influxd"; }

influxdb_go() {
  local go
  go=$(command -v go 2>/dev/null || true)
  [[ -n $go ]] || { [[ -x /usr/local/go/bin/go ]] && go=/usr/local/go/bin/go; }
  [[ -n $go ]] || die "go is not installed (need Go >= 1.23)"
  echo "$go"
}

influxdb_install() {
  local bin; bin=$(influxdb_bin)
  if [[ -x $bin ]]; then
    log "influxd $INFLUXDB_VERSION already built: $bin"
    return 0
  fi
  apt_ensure build-essential clang libclang-dev pkg-config protobuf-compiler curl

  local go cargo_dir home work src started
  go=$(influxdb_go)
  cargo_dir=${CARGO_HOME:-$HOME/.cargo}/bin
  [[ -d $cargo_dir ]] && PATH=$cargo_dir:$PATH
  command -v cargo >/dev/null || die "cargo (Rust) is not installed; install it with rustup"
  home=$(influxdb_home)
  work=$home/build
  src=$work/src
  started=$SECONDS
  mkdir -p "$work/bin"
  log "building influxd $INFLUXDB_VERSION from source in $work (takes a while the first time)"

  # Subshell so the exports stay local; `set -e` does not apply inside a `( ) || ...`, hence the
  # explicit `|| exit 1`s.
  (
    export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local CGO_ENABLED=1
    export GOCACHE=$work/gocache
    cd "$work" || exit 1
    dir=$("$go" mod download -json "github.com/influxdata/influxdb/v2@$INFLUXDB_VERSION" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -d $dir ]] || { log "go mod download of influxdb $INFLUXDB_VERSION failed"; exit 1; }
    rm -rf "$src" && cp -r "$dir" "$src" && chmod -R u+w "$src" && cd "$src" || exit 1
    "$go" build -o "$work/bin/pkg-config" github.com/influxdata/pkg-config || exit 1
    export PATH=$work/bin:$PATH PKG_CONFIG=$work/bin/pkg-config
    export RUSTUP_TOOLCHAIN=$INFLUXDB_RUST_TOOLCHAIN
    if [[ $RUSTUP_TOOLCHAIN != stable ]] && command -v rustup >/dev/null; then
      rustup toolchain install "$RUSTUP_TOOLCHAIN" --profile minimal >&2 || exit 1
    fi
    # flux-core enables `deny(warnings)` (feature "strict"), and newer rustc adds lints
    # (mismatched_lifetime_syntaxes, dead_code on never-constructed structs) that then fail the
    # build. RUSTFLAGS=--cap-lints=warn does not reach build-script dependencies because the
    # wrapper passes --target, so cap lints through RUSTC_WRAPPER instead.
    cat >"$work/bin/rustc-cap-lints" <<'WRAP'
#!/bin/sh
rustc=$1; shift
case " $* " in
  *" --cap-lints"*) ;;
  *" --crate-name "*) exec "$rustc" "$@" --cap-lints warn ;;
esac
exec "$rustc" "$@"
WRAP
    chmod +x "$work/bin/rustc-cap-lints"
    export RUSTC_WRAPPER=$work/bin/rustc-cap-lints
    "$go" build -tags sqlite_foreign_keys,sqlite_json -trimpath \
      -ldflags "-s -w -X main.version=$INFLUXDB_VERSION -X main.commit=modproxy" \
      -o "$work/influxd" ./cmd/influxd || exit 1
  ) || die "influxd build failed (scratch tree kept in $work)"

  install -m 0755 "$work/influxd" "$bin.tmp"
  mv -f "$bin.tmp" "$bin"
  if [[ ${INFLUXDB_KEEP_BUILD:-0} != 1 ]]; then
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
  fi
  log "built $bin in $((SECONDS - started))s: $(INFLUXD_CONFIG_PATH=$home "$bin" version 2>/dev/null || true)"
}

# influxdb_http METHOD PATH [JSON]: call the API with the operator token if there is one.
influxdb_http() {
  local method=$1 path=$2 body=${3:-} args
  args=(-sS --max-time 10 -X "$method")
  [[ -n ${INFLUXDB_TOKEN:-} ]] && args+=(-H "Authorization: Token $INFLUXDB_TOKEN")
  [[ -n $body ]] && args+=(-H 'Content-Type: application/json' --data "$body")
  curl "${args[@]}" "$INFLUXDB_URL$path"
}

influxdb_wait_ready() {
  local secs=${1:-60} i
  for ((i = 0; i < secs * 5; i++)); do
    if curl -sf --max-time 2 "$INFLUXDB_URL/health" 2>/dev/null | grep -q '"status": *"pass"'; then
      return 0
    fi
    is_running influxdb || return 1
    sleep 0.2
  done
  return 1
}

influxdb_up() {
  local dir=$VAR/influxdb bin
  bin=$(influxdb_bin)
  [[ -x $bin ]] || die "influxd is not built; run influxdb_install first"
  mkdir -p "$dir/data"
  if ! is_running influxdb; then
    port_free "$INFLUXDB_PORT" || die "port $INFLUXDB_PORT is taken by another process"
    log "starting influxd on $INFLUXDB_URL"
    # INFLUXD_CONFIG_PATH: don't pick up a stray config.{toml,yaml,json} from the caller's cwd.
    start_daemon influxdb env INFLUXD_CONFIG_PATH="$dir" "$bin" \
      --http-bind-address "$INFLUXDB_HOST:$INFLUXDB_PORT" \
      --bolt-path "$dir/data/influxd.bolt" \
      --sqlite-path "$dir/data/influxd.sqlite" \
      --engine-path "$dir/data/engine" \
      --reporting-disabled --ui-disabled --log-level warn
  fi
  influxdb_wait_ready 90 || die "influxd did not become ready; see $dir/influxdb.log"

  local token_file=$dir/token
  if curl -sS --max-time 10 "$INFLUXDB_URL/api/v2/setup" | grep -q '"allowed": *true'; then
    log "initialising InfluxDB: org $INFLUXDB_ORG, bucket $INFLUXDB_BUCKET, user $INFLUXDB_USER"
    local resp
    resp=$(INFLUXDB_TOKEN='' influxdb_http POST /api/v2/setup "$(printf \
      '{"username":"%s","password":"%s","org":"%s","bucket":"%s","retentionPeriodSeconds":0,"token":"%s"}' \
      "$INFLUXDB_USER" "$INFLUXDB_PASSWORD" "$INFLUXDB_ORG" "$INFLUXDB_BUCKET" "$INFLUXDB_DEV_TOKEN")")
    grep -q '"auth"' <<<"$resp" || die "InfluxDB setup failed: $resp"
    (umask 077; printf '%s\n' "$INFLUXDB_DEV_TOKEN" >"$token_file")
  fi
  if [[ -s $token_file ]]; then INFLUXDB_TOKEN=$(<"$token_file"); else INFLUXDB_TOKEN=$INFLUXDB_DEV_TOKEN; fi
  influxdb_http GET "/api/v2/buckets?org=$INFLUXDB_ORG&name=$INFLUXDB_BUCKET" |
    grep -q "\"name\": *\"$INFLUXDB_BUCKET\"" ||
    die "bucket $INFLUXDB_BUCKET not reachable with the operator token; to start over: influxdb_down; rm -rf $dir"
  [[ -s $token_file ]] || (umask 077; printf '%s\n' "$INFLUXDB_TOKEN" >"$token_file")

  cat >"$dir/env" <<EOF
INFLUXDB_URL=$INFLUXDB_URL
INFLUXDB_TOKEN=$INFLUXDB_TOKEN
INFLUXDB_ORG=$INFLUXDB_ORG
INFLUXDB_BUCKET=$INFLUXDB_BUCKET
EOF
  log "influxdb ready at $INFLUXDB_URL (env in $dir/env)"
}

influxdb_down() { stop_daemon influxdb; }

influxdb_status() { status_line influxdb; }
