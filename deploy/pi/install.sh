#!/bin/sh
# Install or upgrade the Millstream edge agent on a Raspberry Pi (Debian/Raspberry Pi OS).
# Idempotent: run it again to upgrade; an existing /etc/millstream/agent.yaml is kept.
#
#   sudo deploy/pi/install.sh --broker mqtts://broker.example:8883 [--device-id ID] [--site S]
#        [--source PATH|PIP-SPEC] [--extras host,modbus] [--no-start]
#
# Layout: code in /opt/millstream/venv, config in /etc/millstream/agent.yaml (root:millstream
# 0640), secrets in /etc/millstream/agent.env (0600), state in /var/lib/millstream (the queue),
# service millstream-agent (deploy/systemd/millstream-agent.service), user millstream.
set -eu

PREFIX=/opt/millstream
VENV=$PREFIX/venv
CONF_DIR=/etc/millstream
CONF=$CONF_DIR/agent.yaml
ENV_FILE=$CONF_DIR/agent.env
STATE=/var/lib/millstream
UNIT=/etc/systemd/system/millstream-agent.service
USER_NAME=millstream

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BROKER=mqtt://127.0.0.1:1883
DEVICE_ID=$(hostname -s 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)
SITE=default
SOURCE=
EXTRAS=
START=1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER=$2; shift 2 ;;
        --device-id) DEVICE_ID=$2; shift 2 ;;
        --site) SITE=$2; shift 2 ;;
        --source) SOURCE=$2; shift 2 ;;
        --extras) EXTRAS=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo)"
[ -n "$DEVICE_ID" ] || DEVICE_ID=pi

# Python 3.9+ with venv
PY=$(command -v python3 || true)
[ -n "$PY" ] || die "python3 not found (apt-get install python3)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "Python 3.9 or newer is needed, found $("$PY" --version 2>&1)"
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    command -v apt-get >/dev/null || die "python3-venv missing"
    say "installing python3-venv"
    apt-get update -qq && apt-get install -y -qq python3-venv
fi

# user and directories
if ! id -u "$USER_NAME" >/dev/null 2>&1; then
    say "creating system user $USER_NAME"
    useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
install -d -m 0755 "$PREFIX"
install -d -m 0750 -o root -g "$USER_NAME" "$CONF_DIR"
install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$STATE"

# the package: from this checkout by default
if [ -z "$SOURCE" ]; then
    if [ -f "$REPO/edge-agent/pyproject.toml" ]; then SOURCE=$REPO/edge-agent; else SOURCE=millstream-agent; fi
fi
TARGET=$SOURCE
if [ -n "$EXTRAS" ]; then TARGET="$SOURCE[$EXTRAS]"; fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
say "installing $TARGET"
"$VENV/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/pip" install --quiet --upgrade "$TARGET"
if [ -d "$SOURCE" ]; then
    # same version number, newer code: reinstall the agent itself (not its dependencies)
    "$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$SOURCE"
fi
if [ -f "$REPO/docs/agent.md" ]; then install -d "$PREFIX/docs" && install -m 0644 "$REPO/docs/agent.md" "$PREFIX/docs/"; fi

# configuration: generated once, never overwritten
if [ ! -f "$CONF" ]; then
    say "writing $CONF (device $DEVICE_ID, site $SITE, broker $BROKER)"
    "$VENV/bin/millstream-agent" sample-config --broker "$BROKER" --device-id "$DEVICE_ID" \
        --site "$SITE" --queue-path "$STATE/queue.db" > "$CONF.new"
    mv "$CONF.new" "$CONF"
else
    say "keeping existing $CONF"
fi
chown root:"$USER_NAME" "$CONF"
chmod 0640 "$CONF"
if [ ! -f "$ENV_FILE" ]; then
    printf '# Secrets for millstream-agent, e.g.\n# MILLSTREAM_MQTT_PASSWORD=...\n' > "$ENV_FILE"
fi
chown root:root "$ENV_FILE"
chmod 0600 "$ENV_FILE"

"$VENV/bin/millstream-agent" check-config "$CONF" || die "fix $CONF, then run this again"

# service
install -m 0644 "$REPO/deploy/systemd/millstream-agent.service" "$UNIT"
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$START" -eq 1 ]; then
        systemctl enable millstream-agent.service >/dev/null
        systemctl restart millstream-agent.service
        say "started: journalctl -u millstream-agent -f"
    else
        say "installed; start with: systemctl enable --now millstream-agent"
    fi
else
    say "systemd is not running here; unit installed at $UNIT"
fi
