#!/bin/bash
# Written for the ECMDB-era Go ETask (<= v0.0.7): $1 is the params JSON, $2 a KEY=VALUE file
# of the variables to source. Run unchanged by tests/runner.rs with argv_style "legacy".
set -e
source "$2"
host=$(printf '%s' "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["host"])')
echo "checking $host as $DB_USER (password $DB_PASSWORD)"
echo "$DB_PASSWORD" >&2
printf '{"host": "%s", "user": "%s", "password_len": %d}\n' "$host" "$DB_USER" "${#DB_PASSWORD}" >&"$EWORK_RESULT_FD"
