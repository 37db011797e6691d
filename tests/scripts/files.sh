#!/bin/sh
# Written for the Go ETask v1.12: params in $ETASK_ARGS_FILE (JSON), variables in the
# environment and in $ETASK_SHELL_ENV_FILE. Run unchanged by tests/runner.rs.
set -e
. "$ETASK_SHELL_ENV_FILE"
host=$(python3 -c 'import json, os; print(json.load(open(os.environ["ETASK_ARGS_FILE"]))["host"])')
echo "checking $host as $DB_USER (password $DB_PASSWORD)"
echo "$DB_PASSWORD" >&2
printf '{"host": "%s", "user": "%s", "password_len": %d}\n' "$host" "$DB_USER" "${#DB_PASSWORD}" >&"$EWORK_RESULT_FD"
