#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): build, GPU tests, GPU benchmarks, logs to $OUT.
#   tools/gpu-session.sh smoke   # install + GPU tests + small benchmark runs (find what breaks)
#   tools/gpu-session.sh profile # install + GPU tests + where a k-means call spends its time
#   tools/gpu-session.sh full    # install + GPU tests + the recorded benchmarks (k-means a-d, indexed conv)
#   tools/gpu-session.sh large   # install + GPU tests + the e_large k-means workload + the CLI on cuda
#   tools/gpu-session.sh final   # full + large in one call
# Data: ../shared/data does not travel; copy the checkpoints into .device-data/ (git-ignored) and
# name it in the call's `carry`.  Results land in $OUT (copy them into bench/results/ here).
set -uo pipefail
mode=${1:-smoke}
cd "$(dirname "$0")/.."
# everything goes to $W; $OUT (the device tool's folder, which returns at most 8 files) gets one
# archive of it and the main reports
FINAL_OUT=${OUT:-/tmp/kcengine-gpu-out}
OUT=/tmp/kcengine-gpu-work
rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL_OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
[ -d .device-data ] && export KCENGINE_DATA=$PWD/.device-data
[ -f .device-data/COMMIT ] && export KCENGINE_COMMIT=$(cat .device-data/COMMIT)
stamp() { echo "== $(date -u +%T) $*"; }
{ nvidia-smi; nvcc --version; python3 -c "import torch, triton, cupy; print(torch.__version__, triton.__version__, cupy.__version__)"; } \
  > "$OUT/env.txt" 2>&1
stamp install
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
echo "install $(( $(date +%s) - t0 )) s"
cd /tmp  # the installed package, not the source tree
R=$OLDPWD
if [ -z "${SKIP_TESTS:-}" ]; then
  # the tests marked gpu (the interpreter tests belong to CI: the image's triton 3.6 interpreter fails
  # on numpy 2.5 with "only 0-dimensional arrays can be converted to Python scalars")
  stamp gpu tests
  timeout 420 python3 -m pytest -p no:cacheprovider "$R/tests/kmeans/test_gpu_backends.py" \
    "$R/tests/conv/test_triton_kernels.py" "$R/tests/kmeans/test_cuda_sources.py" -m "gpu or not gpu" -q --tb=short -rs \
    --rootdir "$R" -c "$R/pyproject.toml" -k "not interpreted" > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -15 "$OUT/gpu_tests.log"
fi
if [ "$mode" = profile ]; then
  stamp profile
  timeout ${PROFILE_TIMEOUT:-300} python3 "$R/tools/gpu_profile.py" --model resnet18 > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"; grep -E "^#####|^\[" "$OUT/profile.log"
elif [ "$mode" = smoke ]; then
  stamp kmeans smoke
  timeout 240 python3 -m kcengine.bench.kmeans_gpu --model resnet20 --max-problems 300 --sweep-step 8 \
    --out "$OUT" --name kmeans_gpu_smoke > "$OUT/kmeans_smoke.log" 2>&1
  echo "kmeans smoke rc=$?"; tail -25 "$OUT/kmeans_smoke.log"
  stamp conv smoke
  timeout 150 python3 -m kcengine.bench.conv_gpu --batches 1 --divisors 4 --out "$OUT" --name conv_gpu_smoke \
    > "$OUT/conv_smoke.log" 2>&1
  echo "conv smoke rc=$?"; tail -25 "$OUT/conv_smoke.log"
fi
if [ "$mode" = full ] || [ "$mode" = final ]; then
  stamp kmeans bench resnet18
  timeout ${KMEANS_TIMEOUT:-330} python3 -m kcengine.bench.kmeans_gpu --model resnet18 \
    --workloads a_sweep,b_filters,c_kernels,d_element --out "$OUT" > "$OUT/kmeans_gpu.log" 2>&1
  echo "kmeans bench rc=$?"; grep -E "^\| [a-e]_" "$OUT/kmeans_gpu.log" | cut -c1-150
  stamp conv bench
  timeout ${CONV_TIMEOUT:-170} python3 -m kcengine.bench.conv_gpu --out "$OUT" > "$OUT/conv_gpu.log" 2>&1
  echo "conv bench rc=$?"; grep -A12 "^## Summary" "$OUT/indexed_conv_gpu.md"; grep -A8 "^## End to end" "$OUT/indexed_conv_gpu.md"
fi
if [ "$mode" = large ] || [ "$mode" = final ]; then
  stamp kmeans e_large
  timeout ${LARGE_TIMEOUT:-200} python3 -m kcengine.bench.kmeans_gpu --model resnet18 --workloads e_large --methods cuda,triton,torch \
    --out "$OUT" --name kmeans_gpu_large > "$OUT/kmeans_gpu_large.log" 2>&1
  echo "e_large rc=$?"; grep -E "^\| e_" "$OUT/kmeans_gpu_large.log" | cut -c1-150
  stamp cli
  timeout ${CLI_TIMEOUT:-150} python3 -m kcengine bench --model resnet18 --device cuda --quick --out "$OUT/cli" \
    > "$OUT/cli.log" 2>&1
  echo "cli rc=$?"; tail -25 "$OUT/cli.log"
fi
stamp done
tar -C "$OUT" -czf "$FINAL_OUT/all.tgz" .
for f in kmeans_gpu.md kmeans_gpu_large.md indexed_conv_gpu.md gpu_tests.log; do
  [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL_OUT/"
done
ls "$FINAL_OUT"
