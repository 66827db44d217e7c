#!/usr/bin/env bash
# Postgres for teams: one database server holding both Prefect's and MLflow's state.
#
#   sudo infra/postgres/setup.sh            # Debian/Ubuntu: install, start, create roles and databases
#   source .v3flow/postgres.env             # then `v3flow up` / `make run` use Postgres instead of SQLite
#
# Settings (environment): PGHOST (127.0.0.1), PGPORT (5432), V3FLOW_PG_USER (v3flow),
# V3FLOW_PG_PASSWORD (generated once, kept in .v3flow/postgres.env).
set -euo pipefail
cd "$(dirname "$0")/../.."
host=${PGHOST:-127.0.0.1}
port=${PGPORT:-5432}
user=${V3FLOW_PG_USER:-v3flow}
envfile=.v3flow/postgres.env
mkdir -p .v3flow
if [ -f "$envfile" ]; then
  password=$(sed -n 's/^# password: //p' "$envfile")
fi
password=${V3FLOW_PG_PASSWORD:-${password:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}}

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 30); do pg_isready -h "$host" -p "$port" -q && break; sleep 1; done

psql_admin() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtA -p $port -c \"$1\""; }
if [ -z "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='$user'")" ]; then
  psql_admin "CREATE ROLE $user LOGIN PASSWORD '$password'"
else
  psql_admin "ALTER ROLE $user PASSWORD '$password'"
fi
for db in v3flow_prefect v3flow_mlflow; do
  [ -n "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='$db'")" ] || psql_admin "CREATE DATABASE $db OWNER $user"
done

if [ -x .venv/bin/pip ]; then .venv/bin/pip install --quiet -e ".[postgres]"; fi

cat > "$envfile" <<ENV
# Postgres settings for v3flow's servers (made by infra/postgres/setup.sh); source this file.
# password: $password
export V3FLOW_PREFECT_DB_URL=postgresql+asyncpg://$user:$password@$host:$port/v3flow_prefect
export V3FLOW_MLFLOW_BACKEND_URI=postgresql+psycopg://$user:$password@$host:$port/v3flow_mlflow
ENV
chmod 600 "$envfile"
echo "Postgres ready on $host:$port; run: source $envfile && v3flow down && v3flow up"
