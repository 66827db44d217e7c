#!/usr/bin/env bash
# make e2e: a browser check of the Prefect UI (not part of CI). Starts our servers on their own ports and
# state folder, serves the deployments, and lets headless Chromium (Debian's) start a deployment run from
# the UI and watch it complete. Screenshots land in .v3flow/e2e/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
(cd tests/e2e && npm install --no-audit --no-fund --silent)

export V3FLOW_HOME="$PWD/.v3flow/e2e" V3FLOW_PREFECT_PORT=${E2E_PREFECT_PORT:-4210} V3FLOW_MLFLOW_PORT=${E2E_MLFLOW_PORT:-5010}
unset PREFECT_API_URL MLFLOW_TRACKING_URI
mkdir -p "$V3FLOW_HOME"
.venv/bin/v3flow up
export PREFECT_API_URL="http://127.0.0.1:$V3FLOW_PREFECT_PORT/api" MLFLOW_TRACKING_URI="http://127.0.0.1:$V3FLOW_MLFLOW_PORT"
export PREFECT_HOME="$V3FLOW_HOME/prefect"
setsid .venv/bin/v3flow serve > "$V3FLOW_HOME/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -- -$serve_pid 2>/dev/null || true; [ -n "${E2E_KEEP:-}" ] || .venv/bin/v3flow down' EXIT
OUT_DIR="$V3FLOW_HOME" node tests/e2e/run_deployment.mjs "http://127.0.0.1:$V3FLOW_PREFECT_PORT" data v3flow
