#!/bin/bash
# Runs once, inside the influxdb:2.x container, after its initial setup
# (/docker-entrypoint-initdb.d/, with DOCKER_INFLUXDB_INIT_* already applied and the
# `influx` CLI configured with the admin token).
#
# It makes the bucket answer InfluxQL, which is what Millstream's storage backend and
# Grafana's InfluxQL datasource speak (docs/deploy.md):
#   1. a DBRP mapping: database $INFLUXDB_V1_DB / retention policy $INFLUXDB_V1_RP -> bucket
#   2. v1 credentials $INFLUXDB_V1_USER (read+write this bucket): the cloud service
#   3. an API token that can only read this bucket, for Grafana's datasource, written to
#      $GRAFANA_TOKEN_FILE (a volume only InfluxDB and Grafana mount)
set -euo pipefail

bucket="${DOCKER_INFLUXDB_INIT_BUCKET:?}"
org="${DOCKER_INFLUXDB_INIT_ORG:?}"
db="${INFLUXDB_V1_DB:-millstream}"
rp="${INFLUXDB_V1_RP:-autogen}"
user="${INFLUXDB_V1_USER:-millstream}"
password="${INFLUXDB_V1_PASSWORD:?INFLUXDB_V1_PASSWORD is not set}"
token_file="${GRAFANA_TOKEN_FILE:-/millstream-grafana/influxdb-token}"

bucket_id="$(influx bucket list --org "$org" --name "$bucket" --hide-headers | cut -f1)"
if [ -z "$bucket_id" ]; then
    echo "influxdb-init: bucket $bucket not found" >&2
    exit 1
fi

if ! influx v1 dbrp list --org "$org" --db "$db" --hide-headers 2>/dev/null | grep -q .; then
    influx v1 dbrp create --org "$org" --db "$db" --rp "$rp" --bucket-id "$bucket_id" --default
    echo "influxdb-init: InfluxQL database $db/$rp -> bucket $bucket"
fi

if ! influx v1 auth list --org "$org" --user "$user" --hide-headers 2>/dev/null | grep -q .; then
    influx v1 auth create --org "$org" --username "$user" --password "$password" \
        --read-bucket "$bucket_id" --write-bucket "$bucket_id" >/dev/null
    echo "influxdb-init: v1 credentials for $user (read/write $bucket)"
fi

if [ ! -s "$token_file" ]; then
    token="$(influx auth create --org "$org" --read-bucket "$bucket_id" \
        --description "grafana: read $bucket" --json \
        | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' | head -n 1)"
    if [ -z "$token" ]; then
        echo "influxdb-init: could not create Grafana's read token" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$token_file")"
    (umask 0222 && printf '%s' "$token" > "$token_file")
    echo "influxdb-init: read-only API token for Grafana in $token_file"
fi
