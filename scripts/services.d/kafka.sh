# shellcheck shell=bash
# Apache Kafka 4.x, one KRaft node (broker + controller), for the tests and the demo.
# Sourced after common.sh. The jars come from Maven Central through scripts/kafka/pom.xml.
#
# Listeners (all on 127.0.0.1):
#   19092 PLAINTEXT      clients without auth, also the inter-broker listener
#   19093 SASL_SSL       SCRAM-SHA-256, server cert from $CERTS (server.pem/server.key, CA ca.pem)
#   19094 CONTROLLER     KRaft quorum
#   19095 RELAYED        PLAINTEXT, advertised as 127.0.0.1:19096: a client that bootstraps there
#                        reaches the broker only through whatever relays 19096 to 19095 (the
#                        demo's cuttable proxy), so one client's network can fail alone
# Clients read $VAR/kafka/env.

KAFKA_POM=$ROOT/scripts/kafka/pom.xml
KAFKA_VERSION=$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$KAFKA_POM" | head -n1)
KAFKA_HOME=$CACHE/kafka-$KAFKA_VERSION
KAFKA_LIBS=$KAFKA_HOME/libs
KAFKA_DIR=$VAR/kafka
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PLAIN_PORT=19092
KAFKA_SASL_PORT=19093
KAFKA_CONTROLLER_PORT=19094
KAFKA_RELAYED_PORT=19095
KAFKA_RELAYED_ADVERTISED_PORT=19096
KAFKA_SASL_USER=edge
KAFKA_HEAP=${KAFKA_HEAP:-512m}

# The marker holds the pom's checksum, so editing the pom (new version, new jar) re-resolves.
_kafka_pom_sum() { sha256sum "$KAFKA_POM" | cut -d' ' -f1; }

kafka_install() {
  [[ -n $KAFKA_VERSION ]] || die "kafka: no <kafka.version> in $KAFKA_POM"
  local marker=$KAFKA_LIBS/.complete
  if [[ -f $marker && $(cat "$marker") == "$(_kafka_pom_sum)" ]]; then
    return 0
  fi
  command -v java >/dev/null || die "kafka: java (17+) is not installed"
  command -v mvn >/dev/null || die "kafka: maven is not installed"
  log "kafka: resolving Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
  local tmp=$KAFKA_HOME/libs.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$KAFKA_HOME"
  if ! mvn -B -q -f "$KAFKA_POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime >"$KAFKA_HOME/mvn.log" 2>&1; then
    tail -n 30 "$KAFKA_HOME/mvn.log" >&2
    rm -rf "$tmp"
    die "kafka: maven could not resolve the broker jars (log: $KAFKA_HOME/mvn.log)"
  fi
  [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "kafka: kafka_2.13-$KAFKA_VERSION.jar missing after resolve"
  _kafka_pom_sum >"$tmp/.complete"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  log "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars installed"
}

# The SCRAM password is made once and kept beside the data it was formatted into.
_kafka_password() {
  local pf=$KAFKA_DIR/sasl-password
  if [[ ! -s $pf ]]; then
    [[ ! -f $KAFKA_DATA/meta.properties ]] ||
      die "kafka: $KAFKA_DATA is formatted but $pf is gone; remove $KAFKA_DATA to start afresh"
    (umask 077; od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$pf")
  fi
  cat "$pf"
}

# A KRaft cluster id: 16 random bytes, base64url without padding (Kafka's Uuid format).
_kafka_cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    [[ $id != -* ]] && { echo "$id"; return; }
  done
}

# The java command line shared by StorageTool and the broker, as an array (start_daemon
# needs a real command, not a shell function).
KAFKA_JAVA=(java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
  -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
  -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.xml" -Dkafka.logs.dir="$KAFKA_DIR"
  -cp "$KAFKA_LIBS/*")

_kafka_write_config() {
  local f
  for f in ca.pem server.pem server.key; do
    [[ -f $CERTS/$f ]] || die "kafka: $CERTS/$f is missing (run the certs service first)"
  done
  mkdir -p "$KAFKA_DATA"
  # PEM keystore: PKCS#8 private key followed by the certificate chain, in one file.
  (umask 077; cat "$CERTS/server.key" "$CERTS/server.pem" >"$KAFKA_DIR/server-keystore.pem")

  cat >"$KAFKA_DIR/server.properties" <<EOF
# Written by scripts/services.d/kafka.sh; rewritten on every start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PLAIN_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,RELAYED://127.0.0.1:$KAFKA_RELAYED_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PLAIN_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT,RELAYED://127.0.0.1:$KAFKA_RELAYED_ADVERTISED_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,RELAYED:PLAINTEXT
inter.broker.listener.name=PLAINTEXT

sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_DIR/server-keystore.pem
listener.name.sasl_ssl.ssl.client.auth=none

log.dirs=$KAFKA_DATA
num.partitions=3
default.replication.factor=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=104857600
EOF

  cat >"$KAFKA_DIR/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Quiet broker logging: warnings, plus the startup/shutdown lines. stdout goes to kafka.log. -->
<Configuration status="WARN" shutdownHook="disable">
  <Appenders>
    <Console name="out" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.Kafka" level="INFO"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
    <Root level="WARN">
      <AppenderRef ref="out"/>
    </Root>
  </Loggers>
</Configuration>
EOF
}

_kafka_format() {
  [[ -f $KAFKA_DATA/meta.properties ]] && return 0
  local password; password=$(_kafka_password)
  log "kafka: formatting storage in $KAFKA_DATA"
  if ! "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format \
      --config "$KAFKA_DIR/server.properties" \
      --cluster-id "$(_kafka_cluster_id)" --standalone \
      --add-scram "SCRAM-SHA-256=[name=$KAFKA_SASL_USER,password=$password]" \
      >>"$KAFKA_DIR/format.log" 2>&1; then
    tail -n 20 "$KAFKA_DIR/format.log" >&2
    die "kafka: storage format failed (log: $KAFKA_DIR/format.log)"
  fi
}

_kafka_write_env() {
  (umask 077; cat >"$KAFKA_DIR/env" <<EOF
KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PLAIN_PORT
KAFKA_SASL_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_SASL_PORT
KAFKA_SASL_MECHANISM=SCRAM-SHA-256
KAFKA_SASL_USERNAME=$KAFKA_SASL_USER
KAFKA_SASL_PASSWORD=$(_kafka_password)
KAFKA_CA_FILE=$CERTS/ca.pem
KAFKA_RELAYED_LISTENER=127.0.0.1:$KAFKA_RELAYED_PORT
KAFKA_RELAYED_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_RELAYED_ADVERTISED_PORT
EOF
  )
}

_kafka_started_count() {
  local n
  n=$(grep -c 'Kafka Server started' "$1" 2>/dev/null) || true
  echo "${n:-0}"
}

kafka_up() {
  kafka_install
  mkdir -p "$KAFKA_DIR"
  if is_running kafka; then
    _kafka_write_env
    return 0
  fi
  local p
  for p in $KAFKA_PLAIN_PORT $KAFKA_SASL_PORT $KAFKA_CONTROLLER_PORT $KAFKA_RELAYED_PORT; do
    port_free "$p" || die "kafka: port $p is taken by another process"
  done
  _kafka_write_config
  _kafka_format

  local logf=$KAFKA_DIR/kafka.log started=0 i pid
  started=$(_kafka_started_count "$logf")
  log "kafka: starting Kafka $KAFKA_VERSION (KRaft, ports $KAFKA_PLAIN_PORT/$KAFKA_SASL_PORT/$KAFKA_CONTROLLER_PORT)"
  start_daemon kafka "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_DIR/server.properties"
  pid=$(cat "$(pidfile kafka)")

  # Ready = the server logged that startup finished (the broker is unfenced by then, so
  # metadata requests are answered) and both client listeners accept connections.
  for ((i = 0; i < 1200; i++)); do
    kill -0 "$pid" 2>/dev/null || {
      tail -n 30 "$logf" >&2
      rm -f "$(pidfile kafka)"
      die "kafka: the broker exited during startup (log: $logf)"
    }
    (($(_kafka_started_count "$logf") > started)) && break
    sleep 0.1
  done
  ((i < 1200)) || { tail -n 30 "$logf" >&2; kafka_down; die "kafka: not started after 120 s (log: $logf)"; }
  wait_port 127.0.0.1 "$KAFKA_PLAIN_PORT" 30 || die "kafka: port $KAFKA_PLAIN_PORT does not answer"
  wait_port 127.0.0.1 "$KAFKA_SASL_PORT" 30 || die "kafka: port $KAFKA_SASL_PORT does not answer"
  _kafka_write_env
  log "kafka: up (env in $KAFKA_DIR/env)"
}

kafka_down() {
  stop_daemon kafka 30
}

kafka_status() {
  status_line kafka
}
