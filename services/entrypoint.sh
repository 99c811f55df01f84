#!/usr/bin/env bash
# Entrypoint of both images:  online-dpo-entrypoint generator|trainer [extra arguments]
#
# 1. Resolve MODEL. The word `starter` means the demo's starter policy (two-digit addition, trained on the
#    CPU into $MODELS_DIR on the first start, then reused from there); anything else must be a Hugging Face
#    model folder as seen inside the container.
# 2. exec the service with that model. Everything else comes from the environment: GENERATOR_* variables
#    for generator-server; for the trainer TRAINER_CONFIG (its YAML file), GENERATOR_URL (several
#    generation replicas: their URLs separated by commas), GENERATOR_API_KEY, RUN_DIR and WEIGHTS_PUSH,
#    passed as `--set key=value` overrides; with EVAL_TASK set, the held-out reward is measured through the
#    (first) server before and after training. Extra arguments go to `trainer-client train` (e.g.
#    `docker compose run --rm trainer --set steps=10`).
set -euo pipefail

die() {
    echo "online-dpo-entrypoint: $*" >&2
    exit 2
}

# A YAML double-quoted scalar, so a value such as `1e5`, `yes` or `null` stays a string in --set.
yaml_str() {
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

resolve_model() {
    local model=${MODEL:-starter}
    if [[ $model == starter ]]; then
        local starter=(python -m trainer_client.starter --seed "${STARTER_SEED:-0}" --cache-dir "${MODELS_DIR:?}")
        "${starter[@]}" >&2 # trains it on the first start (minutes), with its log on stderr
        "${starter[@]}" | tail -n 1 # cached now: the last line it prints is the folder
    elif [[ -f $model/config.json ]]; then
        echo "$model"
    else
        die "MODEL=$model is not a model folder (no config.json). Set MODEL=starter, or mount a Hugging" \
            "Face folder into the models volume (MODELS_SOURCE in .env) and point MODEL at it."
    fi
}

role=${1:-}
[[ $# -gt 0 ]] && shift
case $role in
    generator)
        model=$(resolve_model)
        exec generator-server --model "$model" "$@"
        ;;
    trainer)
        model=$(resolve_model)
        IFS=, read -ra urls <<<"${GENERATOR_URL:?set GENERATOR_URL, e.g. http://generator:8000}"
        server_url=$(yaml_str "${urls[0]// /}")
        for url in "${urls[@]:1}"; do # several replicas: a YAML list of their URLs
            server_url+=", $(yaml_str "${url// /}")"
        done
        ((${#urls[@]} == 1)) || server_url="[$server_url]"
        overrides=(
            --set "model=$(yaml_str "$model")"
            --set "server_url=$server_url"
            --set "output_dir=$(yaml_str "${RUN_DIR:?}")"
        )
        # GENERATOR_API_KEY reaches trainer-client through the environment, never its command line (ps)
        eval_args=(eval --task "${EVAL_TASK:-}" --server-url "${urls[0]// /}")
        case ${WEIGHTS_PUSH:-auto} in
            auto | http | stream | ipc) overrides+=(--set "push=$WEIGHTS_PUSH") ;;
            shared)
                overrides+=(--set push=shared --set "shared_dir=$(yaml_str "${SHARED_WEIGHTS_DIR:?}")")
                ;;
            *) die "WEIGHTS_PUSH must be auto, http, stream, ipc or shared, not '$WEIGHTS_PUSH'" ;;
        esac
        train=(trainer-client train --config "${TRAINER_CONFIG:?}" "${overrides[@]}" "$@")
        if [[ -z ${EVAL_TASK:-} ]]; then
            exec "${train[@]}"
        fi
        # EVAL_TASK set: greedy held-out reward of what the server serves, before and after training
        echo "held-out reward before training:"
        trainer-client "${eval_args[@]}"
        "${train[@]}"
        echo "held-out reward after training:"
        exec trainer-client "${eval_args[@]}"
        ;;
    *)
        die "usage: online-dpo-entrypoint generator|trainer [arguments]"
        ;;
esac
