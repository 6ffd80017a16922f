#!/usr/bin/env bash
# Pack the Python packages that the lent GPU machine lacks (Ray, faiss, MLflow,
# pytorch-metric-learning and what they need) into .devsite/site.tar.xz, small enough to travel
# with a device call (64 MiB for the working tree and everything carried, all together).
#
#   bash benchmarks/device/pack.sh                     # for the device: CPython 3.12, x86-64
#   bash benchmarks/device/pack.sh --python-version 3.11 --out /tmp/site311.tar.xz \
#       --provided-pins /tmp/provided311.txt     # a local rehearsal (run.sh's header says how)
#
# The requirements are pyproject.toml's dependencies plus the bench extra; pip resolves them for
# the target Python and platform (no install here), the names in provided.txt (the device
# image's own packages: torch, numpy, pyarrow, ...) are left out, and the rest is installed
# into a folder with --target and compressed. run.sh unpacks it there and puts it on
# PYTHONPATH. Needs network access to the package index (this machine's registries).
set -euo pipefail
cd "$(dirname "$0")/../.."

python_version=3.12
out=.devsite/site.tar.xz
provided_pins=/dev/null
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) python_version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --provided-pins) provided_pins=$2; shift 2 ;;
    *) echo "pack.sh: unknown option $1 (expected --python-version X.Y, --out FILE or --provided-pins FILE)" >&2
       exit 2 ;;
  esac
done
# What one device call may carry, less about 2 MiB for the repository itself.
limit_mib=62

platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for glibc in $(seq 5 35); do platforms+=(--platform "manylinux_2_${glibc}_x86_64"); done
target=(--python-version "$python_version" --implementation cp --only-binary=:all: "${platforms[@]}")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
open(sys.argv[1], "w").write("\n".join(project["dependencies"] + project["optional-dependencies"]["bench"]) + "\n")
EOF

echo "resolving for CPython $python_version ..."
python3 -m pip install -q --dry-run --ignore-installed --report "$work/report.json" --target "$work/dry" \
  "${target[@]}" -r "$work/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)

# Left out besides the device's own packages: boto3 and its needs serve S3 only, and the device
# run reads the generated dataset from local disk.
# --provided-pins gets the device's own packages as this resolution pinned them: a rehearsal
# installs those into a bare Python to stand in for the device's image.
python3 - "$work/report.json" benchmarks/device/provided.txt boto3,botocore,s3transfer,jmespath \
  "$provided_pins" > "$work/pins.txt" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
provided = {norm(line.strip()) for line in open(sys.argv[2]) if line.strip() and not line.startswith("#")}
skipped = {norm(name) for name in sys.argv[3].split(",")}
with open(sys.argv[4], "w") as image:
    for item in json.load(open(sys.argv[1]))["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        # torch's CUDA libraries (nvidia-*) and triton come with the device's torch.
        if norm(name).startswith("nvidia-") or norm(name) == "triton":
            continue
        if norm(name) in provided:
            print(f"{name}=={version}", file=image)
        elif norm(name) not in skipped:
            print(f"{name}=={version}")
EOF
echo "packing $(wc -l < "$work/pins.txt") packages: $(tr '\n' ' ' < "$work/pins.txt")"
python3 -m pip install -q --no-deps --no-compile --target "$work/site" "${target[@]}" -r "$work/pins.txt" \
  2> >(grep -v "is ignored: it is neither\|Running pip as the 'root' user" >&2)

# Parts a Python training run never loads, removed to fit the transfer limit:
#   ray/jars                     the Java workers' jar (35 MB);
#   ray/dashboard/client/build   the dashboard's web pages, emptied: the dashboard's API, which
#                                Train V2 and Tune use, does not serve them, but its head exits
#                                (and the second training run of a process hangs) unless the
#                                folder and its static/ exist;
#   ray/rllib                    RLlib;
#   mlflow/server/js             the MLflow UI's web pages (the run writes a sqlite store);
#   *.js.map, __pycache__, bin/  source maps, bytecode, console scripts with this machine's paths.
rm -rf "$work/site/ray/jars" "$work/site/ray/dashboard/client/build" "$work/site/ray/rllib" \
  "$work/site/mlflow/server/js" "$work/site/bin"
mkdir -p "$work/site/ray/dashboard/client/build/static"
find "$work/site" \( -name '*.js.map' -o -name __pycache__ \) -prune -exec rm -rf {} +

mkdir -p "$(dirname "$out")"
tar -C "$work/site" -cf - . | xz -9 -T0 > "$out"
size_mib=$(( $(stat -c %s "$out") / 1048576 ))
echo "wrote $out: ${size_mib} MiB ($(du -sh "$work/site" | cut -f1) unpacked)"
if [ "$size_mib" -gt "$limit_mib" ]; then
  echo "pack.sh: $out is over ${limit_mib} MiB and would not travel with a device call" >&2
  exit 1
fi
