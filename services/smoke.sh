#!/usr/bin/env bash
# `docker compose --profile cpu up` for real, on a running Docker engine (CI runs it from .ci/run):
#
#   bash services/smoke.sh
#
# 1. A Python base image. Where images can be pulled, SMOKE_PYTHON_IMAGE=python:3.11-slim-bookworm uses the
#    Dockerfile's own. Otherwise (CI: no registry reachable) one is built here from Debian packages
#    (mmdebstrap of bookworm with python3, then `docker import`) and reused on later runs. It carries this
#    machine's CA bundle as pip's `cert`, for a TLS-intercepting proxy on the way to PyPI: that bundle goes
#    into this local image only, never into services/Dockerfile.
# 2. A torch index: PyTorch's CPU index (the Dockerfile's TORCH_CPU_INDEX) stands in as a folder served on
#    127.0.0.1, holding the torch version the `cpu` extra pins and its dependencies, as pip on this host
#    resolves them (here: the CPU wheel on local disk). SMOKE_TORCH_CPU_INDEX=URL uses a real index instead.
# 3. Both CPU images, built by `docker compose build` from compose.yaml and services/Dockerfile, with only
#    PYTHON_IMAGE and TORCH_CPU_INDEX given as build arguments (everything else, PyPI included, as users
#    get it). Compose v2 builds with BuildKit, which skips the GPU stages.
# 4. The run, with services/compose.host-network.yaml for an engine without a bridge network (see there) and
#    an env file made from .env.example plus a random key: generator-cpu up until its healthcheck passes,
#    then trainer-cpu for SMOKE_STEPS steps (services/trainer/config.cpu.yaml with `steps` changed, through
#    TRAINER_CONFIG_FILE).
# 5. The checks: the trainer exits 0 and printed the held-out reward before and after; the server serves a
#    weights version >= the steps pushed; the runs volume holds metrics.jsonl (one line per step) and the
#    final checkpoint; `docker compose down -v` leaves no container or volume of the project.
# It tears the project down on failure too, after printing the tail of each service's log. Full logs go to
# SMOKE_LOG_DIR (default runs/smoke). Each stage's time is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

project=online-dpo-smoke
steps=${SMOKE_STEPS:-6}
log_dir=${SMOKE_LOG_DIR:-runs/smoke}
health_timeout=${SMOKE_HEALTH_TIMEOUT:-1800} # seconds: the first start trains the starter model
train_timeout=${SMOKE_TRAIN_TIMEOUT:-1200}
local_base=online-dpo-smoke/python:bookworm
debian_mirror=${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "smoke: $*"; }
die() {
    echo "smoke: FAILED: $*" >&2
    exit 1
}

stage_times=()
stage() { # stage NAME COMMAND...: run it, time it
    local name=$1 start=$SECONDS
    shift
    say "$name ..."
    "$@"
    stage_times+=("$(printf '%-28s %5d s' "$name" $((SECONDS - start)))")
    say "$name: $((SECONDS - start)) s"
}

command -v docker >/dev/null || die "no docker command; install a Docker engine (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers on $(docker context inspect -f '{{.Endpoints.docker.Host}}' 2>/dev/null || echo 'its socket'); start dockerd first"
docker compose version >/dev/null 2>&1 || die "compose v2 (\`docker compose\`) is missing: install the compose plugin"

mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)
tmp=$(mktemp -d)
index_pid=
finished=false
compose=(docker compose -p "$project" --env-file "$tmp/smoke.env" -f compose.yaml
    -f services/compose.host-network.yaml --profile cpu)

cleanup() {
    local rc=$?
    if ! $finished; then
        say "tail of each service's log (full logs: $log_dir):"
        for service in generator-cpu trainer-cpu; do
            "${compose[@]}" logs --no-color --no-log-prefix "$service" >"$log_dir/$service.log" 2>&1 || true
            echo "----- $service" && tail -n 60 "$log_dir/$service.log"
        done
        "${compose[@]}" down -v --remove-orphans >>"$log_dir/down.log" 2>&1 || true
    fi
    [[ -n $index_pid ]] && kill "$index_pid" 2>/dev/null
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' INT TERM # (so that the EXIT trap tears down)

run_logged() { # run_logged LOGNAME COMMAND...: output to the log; its tail on failure
    local log="$log_dir/$1.log"
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 80 "$log" >&2
        die "$* (full log: $log)"
    fi
}

# --- 1: the base image ------------------------------------------------------------------------------------
build_local_base() { # (run by run_logged as an `if` condition, where set -e does not act: hence `|| return`)
    command -v mmdebstrap >/dev/null || die "mmdebstrap is needed to build the base image (apt-get install mmdebstrap)"
    printf '[global]\ncert = /etc/ssl/host-ca-bundle.pem\n' >"$tmp/pip.conf"
    # shellcheck disable=SC2016 # $1 is mmdebstrap's root folder, expanded by the hook's shell
    mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/host-ca-bundle.pem"' \
        --customize-hook="cp $tmp/pip.conf \"\$1/etc/pip.conf\"" \
        bookworm "$tmp/rootfs.tar" "$debian_mirror" || return
    # what python:3.11-slim-bookworm sets that the Dockerfile relies on: PATH (it appends to it), LANG
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$tmp/rootfs.tar" "$local_base" || return
    rm -f "$tmp/rootfs.tar"
}

if [[ -n ${SMOKE_PYTHON_IMAGE:-} ]]; then
    base=$SMOKE_PYTHON_IMAGE
elif docker image inspect "$local_base" >/dev/null 2>&1 && [[ -z ${SMOKE_REBUILD_BASE:-} ]]; then
    base=$local_base
    say "base image $base exists (SMOKE_REBUILD_BASE=1 rebuilds it)"
else
    base=$local_base
    stage "base image (mmdebstrap)" run_logged base-image build_local_base
fi

# --- 2: the torch index -------------------------------------------------------------------------------------
serve_torch_index() {
    local pin python_version port
    pin=$(python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))
print(*[r for r in p["project"]["optional-dependencies"]["cpu"] if r.startswith("torch")])')
    python_version=$(docker run --rm --network host "$base" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    # torch and its dependencies for the image's Python, as pip on this host finds them
    python3 -m pip download -q --only-binary=:all: --python-version "$python_version" -d "$tmp/wheels" "$pin" \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} >"$log_dir/torch-download.log" 2>&1 ||
        die "pip download $pin failed: $(tail -n 20 "$log_dir/torch-download.log")"
    compgen -G "$tmp/wheels/torch-*+cpu-*.whl" >/dev/null ||
        die "pip on this host found no CPU build of $pin ($(ls "$tmp/wheels")); set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    # a PEP 503 index: one folder per project (name normalized), its wheels inside
    local wheel name
    for wheel in "$tmp"/wheels/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
        mkdir -p "$tmp/index/$name" && mv "$wheel" "$tmp/index/$name/"
    done
    # a fixed port where it is free: the index URL is a build argument, so a new one would rebuild the torch layer
    port=$(python3 -c 'import socket, sys
for port in (int(sys.argv[1]), 0):
    try:
        s = socket.socket(); s.bind(("127.0.0.1", port)); print(s.getsockname()[1]); break
    except OSError: pass' "${SMOKE_TORCH_INDEX_PORT:-38117}")
    python3 -m http.server --bind 127.0.0.1 --directory "$tmp/index" "$port" >"$log_dir/torch-index.log" 2>&1 &
    index_pid=$!
    torch_index=http://127.0.0.1:$port/
    for _ in $(seq 50); do
        python3 -c "import urllib.request as u; u.urlopen('${torch_index}torch/', timeout=2)" 2>/dev/null && return
        sleep 0.2
    done
    die "the torch index on $torch_index did not answer"
}

if [[ -n ${SMOKE_TORCH_CPU_INDEX:-} ]]; then
    torch_index=$SMOKE_TORCH_CPU_INDEX
else
    stage "torch index (pip download)" serve_torch_index
fi
say "base image $base, torch index $torch_index"

# --- 3: the images --------------------------------------------------------------------------------------------
# the env file a user makes (.env.example with a key), and this run's settings
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s/^GENERATOR_API_KEY=.*/GENERATOR_API_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')/" \
    .env.example >"$tmp/smoke.env"
sed -e "s/^steps: .*/steps: $steps/" services/trainer/config.cpu.yaml >"$tmp/trainer.yaml"
grep -q "^steps: $steps\$" "$tmp/trainer.yaml" || die "services/trainer/config.cpu.yaml has no 'steps:' line to change"
printf 'TRAINER_CONFIG_FILE=%s\nGENERATOR_HOST_PORT=%s\n' "$tmp/trainer.yaml" "$port" >>"$tmp/smoke.env"

if command -v docker-compose >/dev/null && docker-compose version 2>/dev/null | grep 'version 1\.' >/dev/null; then
    # compose v1 (docker-compose 1.x) reads the same files
    stage "compose v1 reads the files" run_logged compose-v1-config \
        docker-compose -p "$project" --env-file "$tmp/smoke.env" -f compose.yaml \
        -f services/compose.host-network.yaml --profile cpu config -q
fi

build_args=(--build-arg "PYTHON_IMAGE=$base" --build-arg "TORCH_CPU_INDEX=$torch_index")
# one after the other: the trainer's build reuses the generator's layers (all but the last few)
stage "build generator-cpu" run_logged build-generator "${compose[@]}" --progress plain build "${build_args[@]}" generator-cpu
stage "build trainer-cpu" run_logged build-trainer "${compose[@]}" --progress plain build "${build_args[@]}" trainer-cpu
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^online-dpo/' || true

# --- 4: the run -------------------------------------------------------------------------------------------------
container_of() { "${compose[@]}" ps -a -q "$1"; }

wait_healthy() {
    run_logged up-generator "${compose[@]}" up -d --no-build generator-cpu
    local cid status restarts deadline=$((SECONDS + health_timeout))
    cid=$(container_of generator-cpu)
    while :; do
        status=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
        restarts=$(docker inspect -f '{{.RestartCount}}' "$cid")
        [[ $status == "running healthy" ]] && return
        [[ $status == running* && $restarts == 0 ]] ||
            die "generator-cpu stopped or restarted (state: $status, restarts: $restarts)"
        ((SECONDS < deadline)) || die "generator-cpu not healthy after $health_timeout s (state: $status)"
        sleep 5
    done
}

run_trainer() {
    run_logged up-trainer "${compose[@]}" up -d --no-build trainer-cpu
    local cid rc
    cid=$(container_of trainer-cpu)
    rc=$(timeout "$train_timeout" docker wait "$cid") || die "trainer-cpu still running after $train_timeout s"
    "${compose[@]}" logs --no-color --no-log-prefix trainer-cpu >"$log_dir/trainer-cpu.log" 2>&1
    tail -n 20 "$log_dir/trainer-cpu.log"
    [[ $rc == 0 ]] || die "trainer-cpu exited with $rc"
}

stage "generator-cpu healthy" wait_healthy
stage "trainer-cpu: $steps steps" run_trainer

# --- 5: the checks --------------------------------------------------------------------------------------------
check_outputs() {
    local log="$log_dir/trainer-cpu.log" run="$tmp/runs/online-dpo"
    grep -q 'held-out reward before training' "$log" && grep -q 'held-out reward after training' "$log" ||
        die "the trainer did not print the held-out reward before and after training"
    # the server has served every version the trainer pushed (one per step)
    python3 - "http://127.0.0.1:$port/health" "$steps" <<'EOF' || die "the server does not serve the pushed weights"
import json, sys, urllib.request
health = json.load(urllib.request.urlopen(sys.argv[1], timeout=10))
print(f"smoke: the server serves weights version {health['weights_version']} of {health['model']}")
sys.exit(0 if health["weights_version"] >= int(sys.argv[2]) else 1)
EOF
    # ... and they came by its stream port, which `push: auto` takes when the trainer reaches it
    python3 - "http://127.0.0.1:$port/metrics" "$steps" "$tmp/smoke.env" <<'EOF' || die "the pushes did not come by the stream port"
import re, sys, urllib.request
key = re.search(r"^GENERATOR_API_KEY=(.*)$", open(sys.argv[3]).read(), re.M).group(1)
request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {key}"})
metrics = urllib.request.urlopen(request, timeout=10).read().decode()
loads = {}
for labels, value in re.findall(r"^generator_weight_loads_total\{(.*)\} (\S+)$", metrics, re.M):
    labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    if labels.get("outcome") == "ok":
        loads[labels.get("source")] = float(value)
print(f"smoke: weights loaded, by source: {loads}")
sys.exit(0 if loads.get("stream", 0) >= int(sys.argv[2]) else 1)
EOF
    # what docs/COMPOSE.md says to do to get the run out of the runs volume
    run_logged cp-runs "${compose[@]}" cp trainer-cpu:/data/runs/. "$tmp/runs"
    [[ $(grep -c '"step"' "$run/metrics.jsonl") == "$steps" ]] ||
        die "metrics.jsonl in the runs volume does not have $steps lines: $(ls -R "$tmp/runs")"
    local checkpoint
    checkpoint=$(printf '%s/checkpoint-%06d' "$run" "$steps")
    [[ -f $checkpoint/model.safetensors && -f $checkpoint/config.json ]] ||
        die "no final checkpoint $(basename "$checkpoint") in the runs volume: $(ls "$run")"
    say "runs volume: metrics.jsonl ($steps lines), $(basename "$checkpoint")/ ($(du -sh "$checkpoint" | cut -f1))"
}

tear_down() {
    "${compose[@]}" down -v --remove-orphans >"$log_dir/down.log" 2>&1
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$project")
    left+=$(docker volume ls -q --filter "label=com.docker.compose.project=$project")
    [[ -z $left ]] || die "left after 'docker compose down -v': $left"
}

stage "checks" check_outputs
"${compose[@]}" logs --no-color --no-log-prefix generator-cpu >"$log_dir/generator-cpu.log" 2>&1
stage "compose down" tear_down
finished=true

say "passed. Stage times:"
printf '  %s\n' "${stage_times[@]}"
