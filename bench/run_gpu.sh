#!/usr/bin/env bash
# Run benchmarks 1-3 on the lent GPU machine, results into $OUT (the device tool's output folder).
#
#   bash bench/run_gpu.sh 1 2      # generate overhead + vLLM vs transformers (about 5 minutes)
#   bash bench/run_gpu.sh 3        # weight push for 0.1b, 0.5b, 1b (about 5-7 minutes)
#   QUICK=1 bash bench/run_gpu.sh 1   # the same plumbing with --quick settings (CPU check)
#
# vLLM must be staged as ../shared/gpu/README.md describes (wheels copied to /root/stage); if it is not
# installed in /tmp/site yet, this script installs it first (about 10 s). For each benchmark it writes
# NAME.json (all numbers), NAME.md (the printed tables) and NAME.log (everything, vLLM's logs included);
# server logs go to server-logs/. Models are built once into runs/bench/models and reused while the
# machine stays warm.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -d /root/stage ] && [ ! -d /tmp/site/vllm ]; then
  (cd /root/stage && if ls vllm.part* >/dev/null 2>&1; then
    cat vllm.part* > vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm vllm.part*; fi
   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /root/stage/*.whl)
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0  # FlashInfer is not staged
# The in-process engine of benchmark 1 is built after CUDA is initialised in this process: fork would fail.
export VLLM_WORKER_MULTIPROC_METHOD=spawn
DEST=${OUT:-runs/bench}
mkdir -p "$DEST"
QUICK_FLAG=()
[ -n "${QUICK:-}" ] && QUICK_FLAG=(--quick)
[ $# -eq 0 ] && set -- 1 2 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$DEST/gpu.txt" 2>&1
cat "$DEST/gpu.txt"

status=0
for b in "$@"; do
  case $b in
    1) name=generate_overhead ;;
    2) name=vllm_vs_transformers ;;
    3) name=weight_push ;;
    *) echo "unknown benchmark '$b' (choose 1, 2 or 3)"; exit 2 ;;
  esac
  echo "=== benchmark $b: $name $(date -u +%H:%M:%S)"
  started=$SECONDS
  python3 "bench/$name.py" "${QUICK_FLAG[@]}" --out "$DEST/$name.json" > "$DEST/$name.log" 2>&1
  rc=$?
  # The script's own lines (progress and tables), without vLLM's log lines.
  grep -vE '^\(|^(INFO|WARNING|DEBUG) |it/s\]' "$DEST/$name.log" > "$DEST/$name.md"
  sed -n '/^## Benchmark/,$p' "$DEST/$name.md"
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
  if [ $rc -ne 0 ]; then
    status=1
    tail -n 30 "$DEST/$name.log"
  fi
done
mkdir -p "$DEST/server-logs" && cp runs/bench/logs/*.log "$DEST/server-logs/" 2>/dev/null
exit $status
