#!/bin/sh
# Write deploy/.env from deploy/.env.example on first use: every "change-me" becomes a
# fresh random secret. An existing deploy/.env is never touched.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
env_file="$here/.env"
if [ -f "$env_file" ]; then
    echo "init-env: $env_file exists; keeping it"
    exit 0
fi
umask 077
tmp="$env_file.tmp"
: > "$tmp"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        *=change-me)
            secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
            printf '%s=%s\n' "${line%=change-me}" "$secret" >> "$tmp"
            ;;
        *) printf '%s\n' "$line" >> "$tmp" ;;
    esac
done < "$here/.env.example"
mv "$tmp" "$env_file"
chmod 0600 "$env_file"
echo "init-env: wrote $env_file with new random secrets (mode 0600)"
