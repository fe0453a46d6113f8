#!/usr/bin/env bash
# Creates one database per service: every name in APP_DATABASES (space- or
# comma-separated) that does not exist yet.
#
# The postgres image runs the scripts of /docker-entrypoint-initdb.d once, on
# the first start with an empty data volume, as POSTGRES_USER against
# POSTGRES_DB over the local socket. Run by hand it uses the usual PG*
# variables (PGHOST, PGPORT, PGPASSWORD) to find the server.
set -euo pipefail

: "${POSTGRES_USER:?POSTGRES_USER must be set}"
: "${APP_DATABASES:?APP_DATABASES must list the databases to create}"

for db in ${APP_DATABASES//,/ }; do
  echo "init-databases: database ${db}"
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    --set db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')
\gexec
SQL
done
