#!/bin/sh
# `make stack` / `make stack-down`: the compose stack in deploy/ (docs/deploy.md).
#   stack.sh up     generate deploy/.env if missing, build the images, start everything
#   stack.sh down   stop and remove the containers (volumes, certificates, data kept)
#   stack.sh reload-broker   SIGHUP Mosquitto after adding or revoking a device
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
if docker compose version >/dev/null 2>&1; then
    compose="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then
    compose="docker-compose"
else
    echo "stack: needs Docker with the compose plugin (docker compose) and a running engine" >&2
    exit 2
fi
cd "$here"
case "${1:-up}" in
    up)
        sh scripts/init-env.sh
        $compose build
        $compose up -d
        $compose ps
        api_port=$(sed -n 's/^API_PORT=//p' .env); grafana_port=$(sed -n 's/^GRAFANA_PORT=//p' .env)
        echo
        echo "Millstream stack is up:"
        echo "  API      http://127.0.0.1:${api_port:-8000}/docs  (token: $compose run --rm --entrypoint cat setup /secrets/ops/admin-token)"
        echo "  Grafana  http://127.0.0.1:${grafana_port:-3000}   (admin password: GRAFANA_ADMIN_PASSWORD in deploy/.env)"
        echo "  MQTT     mqtts://<this host>:8883 (client certificates: millstream-cloud devices add, see docs/deploy.md)"
        ;;
    down)
        $compose down
        ;;
    reload-broker)
        $compose kill -s HUP mosquitto
        ;;
    *)
        echo "usage: stack.sh up|down|reload-broker" >&2
        exit 2
        ;;
esac
