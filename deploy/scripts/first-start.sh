#!/bin/sh
# First start of the compose stack (the one-shot `setup` service, cloud image, as root).
# Creates what is missing, never replaces what exists, so it is safe on every `up`:
#   /ca/ca.key                      the CA key: only this job ever mounts it
#   /secrets/pki/                   CA cert, CRL, broker cert, cloud + fleet client certs
#   /secrets/broker/acl             the broker ACL, from /secrets/security/devices.json
#   /secrets/grafana/api-token      a read-scope API token for Grafana's datasource
#   /data/security/tokens.sqlite3   API tokens (hashed), in the cloud's data volume
#   /secrets/ops/admin-token        an admin API token for the operator (read it once, delete it)
# Each private key is mode 0600 and owned by the uid of the one service that reads it.
set -eu

# Paths as the setup container sees them (overridable for tests/security/test_deploy.py).
SECRETS=${SECRETS:-/secrets}
DATA=${DATA:-/data}
CA_KEY=${CA_KEY:-/ca/ca.key}
MOSQUITTO_UID=1883     # eclipse-mosquitto image
CLOUD_UID=10001        # deploy/docker/cloud.Dockerfile
AGENT_UID=10002        # deploy/docker/agent.Dockerfile
GRAFANA_UID=472        # grafana/grafana-oss image
INFLUXDB_UID=1000      # influxdb:2.x image (its init script writes Grafana's token there)
GRAFANA_INFLUXDB_TOKEN_DIR=${GRAFANA_INFLUXDB_TOKEN_DIR:-/grafana-influxdb-token}
SIM_SITE=${SIM_SITE:-sim}
BROKER_DNS_NAMES=${BROKER_DNS_NAMES:-mosquitto,localhost}
BROKER_IPS=${BROKER_IPS:-127.0.0.1}

ms() { millstream-cloud "$@" --data-dir "$SECRETS" --ca-key "$CA_KEY"; }

mkdir -p "$SECRETS" "$DATA" "$(dirname "$CA_KEY")"
chmod 0700 "$(dirname "$CA_KEY")"

if [ ! -f "$SECRETS/pki/ca.crt" ]; then
    echo "setup: creating the CA"
    ms pki init --cn "Millstream CA"
fi

if [ ! -f "$SECRETS/pki/server.crt" ]; then
    set --
    old_ifs=$IFS; IFS=,
    for name in $BROKER_DNS_NAMES; do set -- "$@" --dns "$name"; done
    for ip in $BROKER_IPS; do set -- "$@" --ip "$ip"; done
    IFS=$old_ifs
    echo "setup: broker certificate for $BROKER_DNS_NAMES / $BROKER_IPS"
    millstream-cloud pki server-cert --data-dir "$SECRETS" --ca-key "$CA_KEY" "$@"
fi

if [ ! -f "$SECRETS/pki/clients/millstream-cloud.crt" ]; then
    echo "setup: cloud service client certificate"
    ms pki client-cert millstream-cloud
fi

if [ ! -f "$SECRETS/pki/clients/sim-fleet.crt" ]; then
    echo "setup: simulated fleet identity for site $SIM_SITE"
    ms devices add-fleet sim-fleet --site "$SIM_SITE"
fi

# Always rewrite the ACL from the registry (it is derived data).
ms devices acl

mkdir -p "$SECRETS/grafana" "$SECRETS/ops" "$DATA/security"
if [ ! -s "$SECRETS/grafana/api-token" ]; then
    echo "setup: API token for Grafana (scope read)"
    umask 077
    millstream-cloud tokens create --data-dir "$DATA" --name grafana --scope read \
        > "$SECRETS/grafana/api-token"
    millstream-cloud tokens create --data-dir "$DATA" --name ops --scope admin \
        > "$SECRETS/ops/admin-token"
    umask 022
fi

# Ownership: each secret readable by its one reader only.
chown "$MOSQUITTO_UID" "$SECRETS/pki/server.key"
chown "$CLOUD_UID" "$SECRETS/pki/clients/millstream-cloud.key"
chown "$AGENT_UID" "$SECRETS/pki/clients/sim-fleet.key"
chown "$GRAFANA_UID" "$SECRETS/grafana/api-token"
chmod 0400 "$SECRETS/grafana/api-token"
chmod 0755 "$SECRETS" "$SECRETS/pki" "$SECRETS/pki/clients" "$SECRETS/broker" "$SECRETS/grafana"
chmod 0700 "$SECRETS/ops" "$SECRETS/security"
chown -R "$CLOUD_UID:$CLOUD_UID" "$DATA"
if [ -d "$GRAFANA_INFLUXDB_TOKEN_DIR" ]; then
    chown "$INFLUXDB_UID" "$GRAFANA_INFLUXDB_TOKEN_DIR"
    chmod 0755 "$GRAFANA_INFLUXDB_TOKEN_DIR"
fi

millstream-cloud pki status --data-dir "$SECRETS" --ca-key "$CA_KEY"
echo "setup: done. Operator admin token: docker compose run --rm --entrypoint cat setup /secrets/ops/admin-token"
