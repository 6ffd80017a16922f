#!/usr/bin/env bash
# Issue 8's GPU figures in one call of the device tool (one H100/H200, 16 cores, no network):
# it unpacks the packages pack.sh made, then runs the benchmarks most important first, each
# under a time limit cut from one overall budget, so that a part that hangs or fails costs only
# its own figures. Each part's JSON lines land in $OUT/<part>.log; $OUT/run.log says what ran,
# the versions, and each part's exit status and seconds.
#
#   device tool: run(command="bash benchmarks/device/run.sh", carry=[".devsite"], timeout_s=560)
#   rehearsal on a CPU machine, in a Python that has only the device image's packages:
#     bash benchmarks/device/pack.sh --python-version 3.11 --out /tmp/site311.tar.xz \
#         --provided-pins /tmp/provided311.txt
#     python3 -m venv /tmp/devsim && /tmp/devsim/bin/pip install -r /tmp/provided311.txt
#     /tmp/devsim/bin/pip install pytest pytest-timeout   # the device image has them; no resolution pins them
#     OUT=/tmp/devout PYTHON=/tmp/devsim/bin/python bash benchmarks/device/run.sh --smoke \
#         --site /tmp/site311.tar.xz --budget 1500
#
# Options: --smoke (the smallest sizes, on CPU: checks the packages and every part's plumbing),
# --site FILE (the archive, default .devsite/site.tar.xz), --budget SECONDS (default 520: the
# device call's 10-minute limit less start-up and the files' way back).
set -u
cd "$(dirname "$0")/../.."

mode=full
archive=.devsite/site.tar.xz
budget=520
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke; shift ;;
    --site) archive=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/dml-device-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
log() { echo "[$(elapsed)s] $*" | tee -a "$OUT/run.log"; }

if [ ! -f "$archive" ]; then
  log "no $archive: run 'bash benchmarks/device/pack.sh' here first and carry .devsite"
  exit 2
fi
site=/tmp/dml-site
rm -rf "$site" && mkdir -p "$site"
tar -xJf "$archive" -C "$site" || { log "could not unpack $archive"; exit 2; }
# Bytecode once, on all cores: pack.sh ships none, and every Ray worker process would otherwise
# compile Ray and MLflow again on import (a few files of other Pythons' syntax fail; harmless).
"$PY" -m compileall -q -j 0 "$site" >/dev/null 2>&1
# Ray's workers are started by the raylet this driver starts, so they inherit this path.
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
log "unpacked $archive ($mode, budget ${budget}s)"
if ! "$PY" - >>"$OUT/run.log" 2>&1 <<'EOF'
import os, platform, torch, ray, faiss, mlflow, pyarrow, numpy, pytorch_metric_learning
import torchvision, sklearn, yaml, PIL, matplotlib, scipy  # the rest the parts import
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "| ray", ray.__version__,
      "| faiss", faiss.__version__, "gpus", faiss.get_num_gpus(), "| mlflow", mlflow.__version__,
      "| pyarrow", pyarrow.__version__, "| numpy", numpy.__version__,
      "| pml", pytorch_metric_learning.__version__, "| cpus", os.cpu_count())
EOF
then
  log "the packages do not import (see above): stopping"
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/run.log"

# part NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, or what the budget has left.
part() {
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$(( budget - $(elapsed) - 5 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    log "$name: skipped, ${left}s of the budget left"
    return
  fi
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && rc="124 (stopped at its ${limit}s limit)"
  log "$name: rc $rc in $(( $(date +%s) - t0 ))s: $*"
}

# The tests that only run on a GPU first (the device feed's side-stream copy, a training step
# that never waits for the GPU, the torch search on CUDA): the timings after them rest on those
# paths. On a CPU they skip.
part gpu_tests 45 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_device_feed.py tests/test_exact_search.py \
  tests/test_step_syncs.py tests/test_models.py::test_export_embeds_as_the_training_run_s_evaluation_does_on_a_gpu

if [ "$mode" = smoke ]; then
  part decode 60 "$PY" benchmarks/throughput.py --size cpu --decode-only --tiny
  # On a 2-core VM each training run costs 1-2 minutes of Ray start-up and initial embedding.
  part throughput 420 "$PY" benchmarks/throughput.py --size cpu --tiny --losses softtriple,magnet --no-decode
  part refresh_scale 120 "$PY" benchmarks/refresh_cost.py --sizes 2000 --pool-sizes 2000 --dims 16 \
    --embed "tiny_cnn:48:256" --decode ""
  part refresh_training 420 "$PY" benchmarks/refresh_cost.py --sizes "" --pool-sizes "" --embed "" --decode "" \
    --training --every 0 --epochs 2 --storage /tmp/dml-refresh-bench
  part eval 60 "$PY" benchmarks/eval_metrics.py --num 5000 --dim 16 --classes 50 --gpu-num 2000 --gpu-classes 40
else
  # Most important first: the end-to-end throughput against the bare backbone (the >= 95 %
  # goal) and the PML peer; then the 1M x 128 evaluation on the GPU (torch search and k-means;
  # the 100k CPU figures were measured on the CPU machine, so its CPU part here is a token
  # 1,000); then the refresh's cost in training time on one GPU and the re-embedding rate; then
  # the refresh at scale (the exact pools search on the GPU through torch, since faiss-gpu needs
  # CUDA 12's cuBLAS, too big to carry; Magnet's per-class k-means on the 16 cores at 100k
  # only, 1M of it would outlast the part). The limits add up to 510 s; the unpacking and the
  # import probe come out of the same 520 s budget first, so the last part gets what is left.
  part decode 30 "$PY" benchmarks/throughput.py --size gpu --decode-only
  part throughput 195 "$PY" benchmarks/throughput.py --size gpu --losses softtriple,triplet,magnet,pddm \
    --peer-steps 60 --no-decode
  part eval 90 "$PY" benchmarks/eval_metrics.py --num 1000 --dim 128 --classes 10 --no-nmi \
    --gpu-num 1000000 --gpu-classes 10000
  part refresh_training 80 "$PY" benchmarks/refresh_cost.py --sizes "" --pool-sizes "" --decode "" \
    --embed "resnet50:224:4096" --training --every 0 --epochs 3 --storage /tmp/dml-refresh-bench
  part refresh_scale 70 "$PY" benchmarks/refresh_cost.py --sizes 100000 --pool-sizes 100000,1000000 \
    --dims 128,512 --embed "" --decode ""
fi
log "done"
