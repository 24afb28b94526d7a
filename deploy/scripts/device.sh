#!/bin/sh
# Provision or revoke a device in the running compose stack, then reload the broker.
#   deploy/scripts/device.sh add plant1/press-01 broker.example.com   -> ./device-press-01/
#   deploy/scripts/device.sh revoke press-01
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
compose="docker compose"
run() { $compose run --rm -T --entrypoint millstream-cloud setup "$@" --data-dir /secrets --ca-key /ca/ca.key; }
case "${1:-}" in
    add)
        ref=${2:?usage: device.sh add SITE/DEVICE BROKER_HOST}
        host=${3:?usage: device.sh add SITE/DEVICE BROKER_HOST}
        device=${ref#*/}
        out="device-$device"
        run devices add "$ref" --broker-host "$host" --out "/secrets/outbox/$device" >/dev/null
        mkdir -p "$out"
        umask 077
        for f in agent.yaml ca.crt "$device.crt" "$device.key"; do
            $compose run --rm -T --entrypoint cat setup "/secrets/outbox/$device/$f" > "$out/$f"
        done
        $compose run --rm -T --entrypoint rm setup -rf "/secrets/outbox/$device"
        ;;
    revoke)
        run devices revoke "${2:?usage: device.sh revoke DEVICE}"
        ;;
    *)
        echo "usage: device.sh add SITE/DEVICE BROKER_HOST | revoke DEVICE" >&2
        exit 2
        ;;
esac
$compose kill -s HUP mosquitto
[ "${1}" = add ] && echo "device files in $here/$out: copy them to /etc/millstream on the device (docs/agent.md)"
exit 0
