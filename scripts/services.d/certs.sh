# shellcheck shell=bash
# A private CA and a server certificate for 127.0.0.1/localhost, shared by Mosquitto's and Kafka's
# TLS listeners. Generated once per var/ and reused.

certs_install() { command -v openssl >/dev/null || apt_ensure openssl; }

certs_up() {
  [[ -f $CERTS/server.pem && -f $CERTS/ca.pem ]] && return 0
  mkdir -p "$CERTS"
  log "generating a test CA and server certificate in $CERTS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=edge-gateway test CA" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.pem" 2>/dev/null
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$CERTS/server.key" 2>/dev/null
  openssl req -new -key "$CERTS/server.key" -subj "/CN=localhost" -out "$CERTS/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$CERTS/ext.cnf"
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days 3650 -extfile "$CERTS/ext.cnf" -out "$CERTS/server.pem" 2>/dev/null
  chmod 600 "$CERTS"/*.key
}

certs_down() { :; }
certs_status() { [[ -f $CERTS/server.pem ]] && echo "certs: present" || echo "certs: absent"; }
