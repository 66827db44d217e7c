#!/usr/bin/env bash
# make e2e: the browser check of both UIs (not part of CI: ~5 minutes). Starts our servers on their own ports and
# state folder, serves the deployments, and drives headless Chromium (Debian's) through tests/e2e/browser_check.mjs:
# a stage run from its form, its report card, the MLflow run and registry, a schedule's next run.
# Screenshots land in .v3flow/e2e/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
(cd tests/e2e && npm install --no-audit --no-fund --silent)

export V3FLOW_HOME="$PWD/.v3flow/e2e" V3FLOW_PREFECT_PORT=${E2E_PREFECT_PORT:-4210} V3FLOW_MLFLOW_PORT=${E2E_MLFLOW_PORT:-5010}
export PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS=5  # a schedule switched on makes its runs within seconds
unset PREFECT_API_URL MLFLOW_TRACKING_URI
mkdir -p "$V3FLOW_HOME"
.venv/bin/v3flow up
export PREFECT_API_URL="http://127.0.0.1:$V3FLOW_PREFECT_PORT/api" MLFLOW_TRACKING_URI="http://127.0.0.1:$V3FLOW_MLFLOW_PORT"
export PREFECT_HOME="$V3FLOW_HOME/prefect"
setsid .venv/bin/v3flow serve > "$V3FLOW_HOME/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -- -$serve_pid 2>/dev/null || true; [ -n "${E2E_KEEP:-}" ] || .venv/bin/v3flow down' EXIT
mkdir -p "$V3FLOW_HOME/screenshots"
OUT_DIR="$V3FLOW_HOME/screenshots" node tests/e2e/browser_check.mjs "http://127.0.0.1:$V3FLOW_PREFECT_PORT" "$MLFLOW_TRACKING_URI"
