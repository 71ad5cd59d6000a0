#!/usr/bin/env bash
# A local Mosquitto with mutual TLS for config/bench.toml: certificates under bench/certs,
# TLS on 127.0.0.1:8884, plain MQTT for watching on 127.0.0.1:1884. Runs in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "mosquitto not found: apt-get install -y mosquitto mosquitto-clients" >&2; exit 1; }
d=bench/certs; mkdir -p "$d"
if [ ! -f "$d/client.crt" ]; then
  gen() { openssl ecparam -name prime256v1 -genkey -noout -out "$d/$1.key"; }
  gen ca; openssl req -x509 -new -key "$d/ca.key" -subj /CN=redline-bench-ca -days 3650 -out "$d/ca.crt"
  for who in server client; do
    gen $who
    if [ $who = server ]; then cn=localhost; ext="subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"; else cn=GT3-BENCH-01; ext="extendedKeyUsage=clientAuth"; fi
    openssl req -new -key "$d/$who.key" -subj "/CN=$cn" -out "$d/$who.csr"
    openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile <(echo "$ext") -out "$d/$who.crt" 2>/dev/null
  done
  chmod 600 "$d"/*.key
fi
conf=bench/mosquitto.conf
{
  [ "$(id -u)" = 0 ] && echo "user root"
  cat <<CONF
per_listener_settings true
persistence false
log_dest stderr
listener 8884 127.0.0.1
cafile $PWD/$d/ca.crt
certfile $PWD/$d/server.crt
keyfile $PWD/$d/server.key
require_certificate true
use_identity_as_username true
allow_anonymous false
listener 1884 127.0.0.1
allow_anonymous true
CONF
} > "$conf"
exec mosquitto -c "$conf"
