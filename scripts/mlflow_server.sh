#!/usr/bin/env bash
# Start an MLflow tracking server that a team's training jobs log to (see docs/tracking.md).
#
#   bash scripts/mlflow_server.sh                       # sqlite + local artifacts, 127.0.0.1:5000
#   bash scripts/mlflow_server.sh --host 0.0.0.0 --port 5000 \
#       --backend-store-uri postgresql://mlflow@db-host:5432/mlflow \
#       --artifacts-destination s3://my-bucket/mlflow-artifacts
#
# Options (each also read from the environment variable in brackets):
#   --host HOST                      interface to bind [MLFLOW_HOST] (default 127.0.0.1: this
#                                    machine only; 0.0.0.0 for every interface)
#   --port PORT                      [MLFLOW_PORT] (default 5000)
#   --backend-store-uri URI          runs, params, metrics [MLFLOW_BACKEND_STORE_URI]
#                                    (default sqlite:///<store dir>/mlflow.db)
#   --artifacts-destination URI      where artifacts go: a folder or s3://bucket/prefix
#                                    [MLFLOW_ARTIFACTS_DESTINATION] (default <store dir>/artifacts)
#   --store-dir DIR                  folder of the default sqlite file and artifacts
#                                    [MLFLOW_STORE_DIR] (default runs/mlflow-server in this repo)
#   --allowed-hosts LIST             Host headers the server accepts besides localhost and
#                                    private IPs, e.g. mlflow.example.com [MLFLOW_ALLOWED_HOSTS]
#   --workers N                      [MLFLOW_WORKERS] (default 2)
#   -- ARGS                          passed to `mlflow server` as they are
#
# Clients upload artifacts through the server (it proxies them to the destination), so only
# the server needs S3 credentials: the standard AWS chain (AWS_PROFILE, AWS_ACCESS_KEY_ID...,
# an instance role) and MLFLOW_S3_ENDPOINT_URL for an S3-compatible store such as MinIO.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
store_dir="${MLFLOW_STORE_DIR:-$repo/runs/mlflow-server}"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-}"
workers="${MLFLOW_WORKERS:-2}"
extra=()

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "mlflow_server.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) need_value "$@"; host="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --backend-store-uri) need_value "$@"; backend="$2"; shift 2 ;;
    --artifacts-destination) need_value "$@"; artifacts="$2"; shift 2 ;;
    --store-dir) need_value "$@"; store_dir="$2"; shift 2 ;;
    --allowed-hosts) need_value "$@"; allowed_hosts="$2"; shift 2 ;;
    --workers) need_value "$@"; workers="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "mlflow_server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$port" =~ ^[0-9]+$ ]] || { echo "mlflow_server.sh: --port must be a number, got '$port'" >&2; exit 2; }

if [[ -x "$repo/.venv/bin/mlflow" ]]; then
  mlflow="$repo/.venv/bin/mlflow"; python="$repo/.venv/bin/python"
elif command -v mlflow >/dev/null; then
  mlflow="$(command -v mlflow)"; python="$(dirname "$mlflow")/python"
else
  echo "mlflow_server.sh: no mlflow found: run 'bash scripts/setup.sh' or 'pip install mlflow'" >&2
  exit 2
fi

if [[ -z "$backend" ]]; then
  mkdir -p "$store_dir"
  backend="sqlite:///$(cd "$store_dir" && pwd)/mlflow.db"
fi
case "$backend" in
  sqlite:///*) ;;
  postgresql://*|postgresql+psycopg://*)
    # SQLAlchemy 2.1 reads postgresql:// with psycopg (3); an older one with psycopg2.
    if ! "$python" -c "import psycopg" 2>/dev/null; then
      if [[ "$backend" == postgresql://* ]] && "$python" -c "import psycopg2" 2>/dev/null; then
        backend="postgresql+psycopg2://${backend#postgresql://}"
      else
        echo "mlflow_server.sh: a PostgreSQL store needs psycopg: $python -m pip install 'psycopg[binary]'" >&2
        exit 2
      fi
    fi ;;
  postgresql+psycopg2://*)
    "$python" -c "import psycopg2" 2>/dev/null || {
      echo "mlflow_server.sh: postgresql+psycopg2:// needs psycopg2: $python -m pip install psycopg2-binary" >&2
      exit 2
    } ;;
  *://*) ;;  # mysql://, mssql://: MLflow says what it is missing
  *) echo "mlflow_server.sh: --backend-store-uri must be a URI (sqlite:///..., postgresql://...), got '$backend'" >&2
     exit 2 ;;
esac
if [[ -z "$artifacts" ]]; then
  artifacts="$store_dir/artifacts"
fi
case "$artifacts" in
  s3://*) "$python" -c "import boto3" 2>/dev/null || {
            echo "mlflow_server.sh: s3:// artifacts need boto3: $python -m pip install boto3" >&2; exit 2; } ;;
  *://*) ;;
  *) mkdir -p "$artifacts"; artifacts="$(cd "$artifacts" && pwd)" ;;
esac

args=(server --host "$host" --port "$port" --backend-store-uri "$backend"
      --artifacts-destination "$artifacts" --serve-artifacts --workers "$workers")
if [[ -n "$allowed_hosts" ]]; then
  args+=(--allowed-hosts "$allowed_hosts")
fi
echo "MLflow server on http://$host:$port (store: $backend, artifacts: $artifacts)"
if [[ "$host" == "127.0.0.1" || "$host" == "localhost" ]]; then
  echo "bound to this machine only: jobs elsewhere cannot reach it (use --host 0.0.0.0 for a team)"
fi
echo "point a job at it: python -m jobs.train --set tracking.tracking_uri=http://<this host>:$port"
exec "$mlflow" "${args[@]}" "${extra[@]}"
