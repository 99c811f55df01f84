"""docker compose without a Docker engine: everything that can be checked without one, checked for real.

The images and the `cpu` profile on a real engine are services/smoke.sh's job (CI runs it after the tests,
docs/COMPOSE.md "Running it for real"); these tests need no engine and run everywhere.

1. ``compose.yaml`` is valid against the Compose Specification's JSON schema, as written and as
   interpolated from ``.env.example``. The schema is the official ``compose-spec.json`` (Apache-2.0) in the
   copy that the PyPI package ``check-jsonschema`` vendors with its license, so no download is needed.
2. Profiles: with ``.env.example``, ``docker compose up`` selects exactly the GPU pair and
   ``docker compose --profile cpu up`` exactly the CPU pair (compose's rule: ``--profile`` replaces
   COMPOSE_PROFILES); dependencies stay inside a profile; only the GPU pair reserves GPUs.
3. Images: the targets compose builds exist in ``services/Dockerfile``, run as a non-root user, install the
   project with the right extra from this source tree, and copy only files the build context has.
4. Nothing secret is committed or baked in.
5. The real run: the CPU pair's entrypoint commands (the ENTRYPOINT of their Dockerfile targets) and the
   generator's healthcheck command (compose.yaml) run here as processes, with the environment the
   containers get (image ENV, then compose ``environment`` interpolated from ``.env.example``). Emulated,
   as Docker would provide them: volumes become temporary folders, bind mounts their files, image paths
   (/opt/venv, the home folder) this virtualenv and a temporary folder, the service name in URLs
   127.0.0.1. Changed, and said so: the server listens on 127.0.0.1 and a free port instead of 0.0.0.0:8000,
   the CPU KV cache is 1 GiB, the training run is 2 short steps (extra arguments, as with
   ``docker compose run trainer-cpu --set steps=2``), and the models volume is seeded with the starter
   model from the default cache (the entrypoint then finds it there, as on a second start).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from server_process import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "services" / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
API_KEY = "31415926535897932384"
"""Digits only: it must reach the trainer as a string (it goes through the environment, not YAML)."""
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD", re.I)
STEPS = 2
START_TIMEOUT_S = 900.0
"""Generous: on a 2-core machine that other jobs keep busy, the CPU engine took 450 s to start."""


# ----------------------------------------------------------------------------------------------------------
# compose emulation: .env, interpolation, profiles
# ----------------------------------------------------------------------------------------------------------
def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blank lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation of every string value: ``$$``, ``$VAR``, ``${VAR}``,
    ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        dollar, name, op, arg, bare = m.groups()
        if dollar:
            return "$"
        name = name or bare
        current = env.get(name)
        present = bool(current) if op and op.startswith(":") else current is not None
        if op in (":-", "-"):
            return current if present else arg
        if op in (":?", "?"):
            if not present:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return current
        if op in (":+", "+"):
            return arg if present else ""
        return current or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    """compose.yaml, YAML anchors and merge keys resolved; interpolated when ``env`` is given."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    return data if env is None else interpolate(data, env)


def selected_services(compose: dict, cli_profiles: list[str], env: dict[str, str]) -> set[str]:
    """What ``docker compose [--profile P ...] up`` starts; ``--profile`` replaces COMPOSE_PROFILES."""
    profiles = set(cli_profiles) or {
        p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()
    }
    return {
        name
        for name, service in compose["services"].items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


def example_env(**extra: str) -> dict[str, str]:
    """What compose interpolates from: .env.example as shipped, plus an API key (which it leaves empty)."""
    return {**read_dotenv(ENV_EXAMPLE), "GENERATOR_API_KEY": API_KEY, **extra}


# ----------------------------------------------------------------------------------------------------------
# Dockerfile: stages, and what a target's image holds (ENV, USER, ENTRYPOINT, copied files)
# ----------------------------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, backslash continuations joined."""
    out, buffer = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not buffer and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (buffer + line).strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buffer = ""
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced where ``variables`` has them; others left for a later pass."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str]
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(build_args: dict[str, str]) -> dict[str, Stage]:
    """The stages of services/Dockerfile by name, ``FROM`` and ``ARG`` values resolved with ``build_args``."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", expand(rest, global_args), re.I)
            assert m, f"cannot read FROM {rest}"
            stage = Stage(name=m[2] or f"stage-{len(stages)}", base=m[1], args={})
            stages[stage.name] = stage
        elif word == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            global_args[name] = build_args.get(name, default)
        elif stage is not None:
            if word == "ARG":  # in a stage: the build arg, else this default, else the global value
                name, eq, default = rest.partition("=")
                stage.args[name] = build_args.get(name, default if eq else global_args.get(name, ""))
            stage.instructions.append((word, expand(rest, stage.args)))
    return stages


@dataclass
class Image:
    """What a Dockerfile target's image holds, as far as running its entrypoint needs."""

    chain: list[Stage]  # base-most stage first
    env: dict[str, str]
    user: str
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    copies: list[tuple[list[str], str]]  # ([sources], destination)

    def instructions(self, word: str) -> list[str]:
        return [rest for stage in self.chain for w, rest in stage.instructions if w == word]


def image_of(target: str, build_args: dict[str, str]) -> Image:
    stages = dockerfile_stages(build_args)
    assert target in stages, f"compose builds target {target!r}, which services/Dockerfile does not have"
    chain = [stages[target]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    chain.reverse()
    # the base image's own PATH is unknown here: this machine's stands in for it
    env, user, workdir, entrypoint, cmd, copies = {"PATH": os.environ["PATH"]}, "root", "/", [], [], []
    for stage in chain:
        for word, rest in stage.instructions:
            if word == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = expand(value, env)
            elif word == "USER":
                user = rest
            elif word == "WORKDIR":
                workdir = rest
            elif word in ("ENTRYPOINT", "CMD"):
                assert rest.startswith("["), f"{word} must use the exec form (JSON array): {rest}"
                if word == "ENTRYPOINT":
                    entrypoint, cmd = json.loads(rest), []
                else:
                    cmd = json.loads(rest)
            elif word == "COPY":
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                copies.append((parts[:-1], parts[-1]))
    return Image(chain, env, user, workdir, entrypoint, cmd, copies)


def service_image(compose: dict, service: str) -> Image:
    build = compose["services"][service]["build"]
    assert Path(ROOT / build["context"]).resolve() == ROOT and ROOT / build["dockerfile"] == DOCKERFILE
    return image_of(build["target"], {k: str(v) for k, v in build.get("args", {}).items()})


def copied_file(image: Image, container_path: str) -> Path:
    """The file of this repository that the image holds at ``container_path`` (copied by a COPY)."""
    for sources, dest in image.copies:
        for src in sources:
            if dest == container_path or (dest.endswith("/") and dest + Path(src).name == container_path):
                return ROOT / src
    raise AssertionError(f"no COPY puts a file at {container_path}")


def executable_path(image: Image, name: str) -> Path:
    """The repository file behind command ``name`` of the image (found on the image's PATH)."""
    for directory in image.env["PATH"].split(":"):
        try:
            return copied_file(image, f"{directory.rstrip('/')}/{name}")
        except AssertionError:
            continue
    raise AssertionError(f"{name} is not copied into any folder on the image's PATH")


# ----------------------------------------------------------------------------------------------------------
# a service as a local process: its environment, with container paths and service names remapped
# ----------------------------------------------------------------------------------------------------------
def env_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def mounts(spec: dict) -> list[tuple[str, str]]:
    """``(source, target)`` of a service's ``volumes``, short (``source:target[:mode]``) or long form."""
    out = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume["source"], volume["target"]))
        else:
            source, target = volume.split(":")[:2]
            out.append((source, target))
    return out


def config_file(compose: dict, service: str) -> Path:
    """The trainer config file on the host that ``service`` mounts at TRAINER_CONFIG (a bind mount)."""
    spec = compose["services"][service]
    target = spec["environment"]["TRAINER_CONFIG"]
    (source,) = [s for s, t in mounts(spec) if t == target]
    return (ROOT / source).resolve()


def container_paths(compose: dict, service: str, image: Image, tmp: Path) -> dict[str, Path]:
    """Container path -> local path: volumes and bind mounts, the image's virtualenv and the user's home."""
    spec = compose["services"][service]
    paths: dict[str, Path] = {}
    for source, target in mounts(spec):
        if source.startswith((".", "/")):
            paths[target] = (ROOT / source).resolve()
        else:
            assert source in compose["volumes"], f"{service}: volume {source} is not declared"
            paths[target] = tmp / "volumes" / source
    if "VIRTUAL_ENV" in image.env:
        paths[image.env["VIRTUAL_ENV"]] = Path(sys.prefix)
    paths.setdefault(image.env["HOME"], tmp / "home")
    for path in paths.values():
        if not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
    return paths


def remap(value: str, paths: dict[str, Path], hosts: dict[str, str]) -> str:
    for container in sorted(paths, key=len, reverse=True):
        value = re.sub(rf"(?<![\w/.]){re.escape(container)}(?=/|:|$)", str(paths[container]), value)
    for container_address, local_address in hosts.items():
        value = value.replace(f"//{container_address}", f"//{local_address}")
    return value


@dataclass
class LocalService:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    paths: dict[str, Path]
    healthcheck: dict | None


def local_service(compose, name, tmp: Path, hosts: dict[str, str], overrides: dict[str, str]) -> LocalService:
    """Service ``name`` of the interpolated ``compose`` as a local command, environment and folder."""
    spec = compose["services"][name]
    image = service_image(compose, name)
    paths = container_paths(compose, name, image, tmp)
    environment = {**image.env, **{k: env_value(v) for k, v in spec.get("environment", {}).items()}}
    inherited = {
        k: v for k, v in os.environ.items() if k not in environment and not k.startswith("GENERATOR_")
    }
    env = {**inherited, **{k: remap(v, paths, hosts) for k, v in environment.items()}, **overrides}
    entrypoint = spec.get("entrypoint", image.entrypoint)
    argv = [str(executable_path(image, entrypoint[0])), *entrypoint[1:], *spec.get("command", image.cmd)]
    cwd = Path(remap(spec.get("working_dir", image.workdir), paths, hosts))
    return LocalService(name, argv, env, cwd, paths, spec.get("healthcheck"))


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"healthcheck test must be CMD or CMD-SHELL, not {kind}"
    return rest if kind == "CMD" else ["/bin/sh", "-c", rest[0]]


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def run_healthcheck(service: LocalService) -> subprocess.CompletedProcess:
    check = service.healthcheck
    return subprocess.run(
        healthcheck_argv(check["test"]),
        env=service.env,
        cwd=service.cwd,
        capture_output=True,
        text=True,
        timeout=seconds(check.get("timeout", "30s")) + 5,
    )


# ----------------------------------------------------------------------------------------------------------
# 1-4: static checks
# ----------------------------------------------------------------------------------------------------------
def compose_schema_validator():
    """The Compose Specification schema, as check-jsonschema vendors it (with its Apache-2.0 license)."""
    from importlib import resources

    import jsonschema

    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is needed for the Compose schema: pip install check-jsonschema")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)
    return validator(schema, format_checker=validator.FORMAT_CHECKER)


@pytest.mark.parametrize("interpolated", [False, True], ids=["as-written", "interpolated"])
def test_compose_file_is_valid_against_the_compose_schema(interpolated):
    validator = compose_schema_validator()
    compose = load_compose(example_env() if interpolated else None)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    # the validator does reject what compose would reject
    compose["services"]["generator"]["no_such_key"] = 1
    assert list(validator.iter_errors(compose))


def test_profiles_select_the_gpu_pair_by_default_and_the_cpu_pair_with_profile_cpu():
    env = example_env()
    compose = load_compose(env)
    services = compose["services"]
    assert selected_services(compose, [], env) == {"generator", "trainer"}
    assert selected_services(compose, ["cpu"], env) == {"generator-cpu", "trainer-cpu"}
    for name, service in services.items():
        assert len(service.get("profiles", [])) == 1, f"{name} must belong to exactly one profile"
        for dependency, how in service.get("depends_on", {}).items():
            assert service["profiles"] == services[dependency]["profiles"], f"{name} -> {dependency}"
            assert how["condition"] == "service_healthy"
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpu = service["profiles"] == ["gpu"]
        assert bool(devices) == gpu, f"{name}: GPU reservation only in the gpu profile"
        if gpu:
            assert devices[0]["capabilities"] == ["gpu"] and devices[0]["device_ids"] == ["0"]
    # two GPUs: one per service, from .env
    two = load_compose(example_env(GENERATOR_GPUS="0", TRAINER_GPUS="1"))["services"]
    ids = {
        s: two[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for s in ("generator", "trainer")
    }
    assert ids == {"generator": ["0"], "trainer": ["1"]}
    # both pairs: the generator has a healthcheck, the trainer reaches it by its service name
    for generator, trainer in (("generator", "trainer"), ("generator-cpu", "trainer-cpu")):
        assert services[generator]["healthcheck"]["test"][0] == "CMD"
        assert services[trainer]["environment"]["GENERATOR_URL"] == f"http://{generator}:8000"
        assert services[generator]["environment"]["GENERATOR_API_KEY"] == API_KEY
        assert services[trainer]["environment"]["GENERATOR_API_KEY"] == API_KEY


@pytest.mark.parametrize("service", ["generator", "generator-cpu"])
def test_every_server_setting_compose_passes_is_one_the_server_accepts(service, monkeypatch):
    """A misspelt GENERATOR_* variable would be ignored silently; a bad value would stop the container."""
    from generator_server.config import ServerSettings

    environment = load_compose(example_env())["services"][service]["environment"]
    settings = {k: env_value(v) for k, v in environment.items() if k.startswith("GENERATOR_")}
    unknown = {k for k in settings if k.removeprefix("GENERATOR_").lower() not in ServerSettings.model_fields}
    assert not unknown, f"{service}: not server settings: {unknown}"
    for key in [k for k in os.environ if k.startswith("GENERATOR_")]:
        monkeypatch.delenv(key)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    parsed = ServerSettings(model="/data/models/any")
    assert parsed.host == "0.0.0.0" and parsed.port == 8000 and parsed.api_key == API_KEY


@pytest.mark.parametrize("service", ["trainer", "trainer-cpu"])
def test_trainer_config_with_the_entrypoint_overrides_validates(service):
    from trainer_client.config import load_config

    compose = load_compose(example_env())
    path = config_file(compose, service)
    variant = "cpu" if service.endswith("-cpu") else "gpu"
    assert path == ROOT / "services" / "trainer" / f"config.{variant}.yaml"
    env = compose["services"][service]["environment"]
    overrides = [
        f"model={env['MODEL']}",
        f"server_url={env['GENERATOR_URL']}",
        f"output_dir={env['RUN_DIR']}",
    ]
    config = load_config(path, overrides)
    assert config.device == ("cpu" if service.endswith("-cpu") else "cuda")


def test_images_install_this_source_tree_and_run_as_non_root():
    import tomllib

    from packaging.requirements import Requirement

    compose = load_compose(example_env())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    allowed = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")]
    for name, service in compose["services"].items():
        variant = service["build"]["args"]["VARIANT"]
        image = service_image(compose, name)
        assert image.user not in ("", "root", "0") and not image.user.startswith(("root:", "0:")), name
        assert image.entrypoint[1] == name.removesuffix("-cpu"), f"{name} starts the wrong role"
        run = " ".join(image.instructions("RUN"))
        assert f'pip install ".[{variant}]"' in run, f"{name}: project not installed with the {variant} extra"
        assert "pip install --no-deps --force-reinstall ." in run, f"{name}: the real sources not installed"
        for sources, _ in image.copies:
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file"
                assert f"!{src.split('/')[0]}" in allowed or f"!{src.split('/')[0]}/" in allowed, (
                    f"{name}: COPY {src} is outside the build context (.dockerignore)"
                )
        if variant == "gpu":
            assert image.chain[0].base.startswith("nvidia/cuda:"), "GPU image must start from a CUDA image"
            assert "--constraint constraints-gpu.txt" in run
            constraints = (ROOT / "services" / "constraints-gpu.txt").read_text().splitlines()
            pins = [Requirement(r) for r in constraints if r.strip() and not r.startswith("#")]
            (vllm,) = [Requirement(r) for r in extras["gpu"] if r.startswith("vllm")]
            for pin in pins:
                assert pin.name == "vllm" and next(iter(pin.specifier)).version in vllm.specifier, pin
        else:
            # torch's CPU wheel, at the version the `cpu` extra pins (read from pyproject at build time)
            assert '--index-url "https://download.pytorch.org/whl/cpu"' in run
            step = next(part for part in run.split(" && ") if part.startswith("torch_pin="))
            path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
            pin = subprocess.run(
                ["sh", "-c", f'{step}; printf %s "$torch_pin"'], cwd=ROOT, env={**os.environ, "PATH": path},
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert pin.startswith("torch==") and pin in extras["cpu"], pin
            assert "pip uninstall -y torchvision torchaudio torchcodec" in run


def test_nothing_secret_is_committed_or_baked_in():
    # .env holds the real key: ignored by git and kept out of every build context
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True).stdout
    assert not tracked.strip(), ".env is committed"
    ignore = DOCKERIGNORE.read_text().splitlines()
    assert "*" in ignore and not any(p.startswith("!.env") for p in ignore), ".env in the build context"
    # .env.example: placeholders only, and compose refuses to start until the key is filled in
    with pytest.raises(ValueError, match="GENERATOR_API_KEY"):
        load_compose(read_dotenv(ENV_EXAMPLE))
    for key, value in read_dotenv(ENV_EXAMPLE).items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example sets {key}"
    # compose.yaml: secrets only as required variables, never a literal or a default
    for name, service in load_compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{" + key + r":\?[^}]*\}", str(value)), f"{name}: {key}={value}"
    # the images: no secret-named ENV/ARG, nothing that copies the whole context or a .env
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word in ("ENV", "ARG"):
            names = [item.partition("=")[0] for item in shlex.split(rest)]
            assert not any(SECRET_NAME.search(n) for n in names), f"{word} {rest}"
        if word in ("COPY", "ADD"):
            assert ".env" not in rest and not re.search(r"(^|\s)\.(\s|$)", rest), f"{word} {rest}"
    # no token-looking strings in any file of the compose setup
    files = [
        COMPOSE_FILE,
        ENV_EXAMPLE,
        DOCKERIGNORE,
        *(p for p in (ROOT / "services").rglob("*") if p.is_file()),
    ]
    for path in files:
        text = path.read_text()
        assert not re.search(r"\b(hf_|sk-|ghp_)[A-Za-z0-9]{16,}|(?<!sha256:)\b[A-Fa-f0-9]{32,}\b", text), path


# ----------------------------------------------------------------------------------------------------------
# 5: the CPU pair for real
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_stack(tmp_path_factory):
    """``generator-cpu`` started by its entrypoint, in its compose environment; healthy by its healthcheck."""
    from trainer_client.starter import StarterConfig, ensure_starter

    tmp = tmp_path_factory.mktemp("compose")
    compose = load_compose(example_env())
    port = free_port()
    hosts = {"generator-cpu:8000": f"127.0.0.1:{port}"}
    overrides = {"GENERATOR_HOST": "127.0.0.1", "GENERATOR_PORT": str(port), "VLLM_CPU_KVCACHE_SPACE": "1"}
    generator = local_service(compose, "generator-cpu", tmp, hosts, overrides)
    trainer = local_service(compose, "trainer-cpu", tmp, hosts, {})

    # the models volume as after a first start: the starter model (cached across test modules) in place
    assert generator.env["MODEL"] == "starter"
    starter = ensure_starter(StarterConfig(seed=int(generator.env["STARTER_SEED"])))
    models = Path(generator.env["MODELS_DIR"])
    shutil.copytree(starter, models / "starters" / starter.name)

    # before the server is up, the healthcheck fails
    assert run_healthcheck(generator).returncode != 0

    log_path = tmp / "generator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            generator.argv, env=generator.env, cwd=generator.cwd, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    started = time.monotonic()
    try:
        while (check := run_healthcheck(generator)).returncode != 0:
            assert proc.poll() is None, (
                f"generator exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
            )
            tail = f"{check.stderr[-500:]}\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() - started < START_TIMEOUT_S, f"not healthy:\n{tail}"
            time.sleep(2)
        print(f"\ngenerator-cpu healthy after {time.monotonic() - started:.0f} s (log {log_path})")
        yield dict(
            generator=generator, trainer=trainer, url=f"http://127.0.0.1:{port}", tmp=tmp, log=log_path
        )
    finally:
        stop_process_group(proc)


def test_generator_entrypoint_serves_the_starter_with_the_compose_environment(cpu_stack):
    url, generator = cpu_stack["url"], cpu_stack["generator"]
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert Path(health["model"]).is_relative_to(generator.paths["/data/models"])  # the models volume
    assert httpx.get(f"{url}/weights", timeout=10).status_code == 401  # the key from .env is in force
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{url}/weights", headers=headers, timeout=10).status_code == 200


def test_healthcheck_passes_against_the_running_server(cpu_stack):
    check = run_healthcheck(cpu_stack["generator"])
    assert check.returncode == 0, check.stderr


def test_trainer_entrypoint_completes_a_short_run_against_it(cpu_stack):
    trainer, url = cpu_stack["trainer"], cpu_stack["url"]
    version_before = httpx.get(f"{url}/health", timeout=10).json()["weights_version"]
    extra = ["--set", f"steps={STEPS}", "--set", "batch_size=8", "--set", "checkpoint_every=0"]
    log_path = cpu_stack["tmp"] / "trainer.log"
    with open(log_path, "wb") as log:
        done = subprocess.run(
            [*trainer.argv, *extra], env=trainer.env, cwd=trainer.cwd, stdout=log, stderr=subprocess.STDOUT,
            timeout=900,
        )  # fmt: skip
    output = log_path.read_text()
    assert done.returncode == 0, output[-6000:]
    # the run's output is in the runs volume, one metrics line per step
    run_dir = Path(trainer.env["RUN_DIR"])
    assert run_dir.is_relative_to(trainer.paths["/data/runs"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    # every step's weights reached the server, and EVAL_TASK measured the held-out reward around the run
    assert httpx.get(f"{url}/health", timeout=10).json()["weights_version"] >= version_before + STEPS
    assert "held-out reward before training" in output and "held-out reward after training" in output


def test_trainer_pushes_through_the_shared_volume_with_weights_push_shared(cpu_stack):
    from trainer_client.config import TrainConfig

    if not {"push", "shared_dir"} <= set(TrainConfig.model_fields):
        pytest.skip("this trainer has no `push: shared` / `shared_dir` config keys")
    url, tmp = cpu_stack["url"], cpu_stack["tmp"]
    hosts = {"generator-cpu:8000": url.removeprefix("http://")}
    compose = load_compose(example_env(WEIGHTS_PUSH="shared", RUN_NAME="shared-push"))
    trainer = local_service(compose, "trainer-cpu", tmp, hosts, {"EVAL_TASK": ""})
    shared = Path(trainer.env["SHARED_WEIGHTS_DIR"])
    # the trainer writes where the server may load from: the same checkpoints volume, below its root
    assert shared.is_relative_to(Path(cpu_stack["generator"].env["GENERATOR_CHECKPOINT_ROOT"]))
    version_before = httpx.get(f"{url}/health", timeout=10).json()["weights_version"]
    extra = ["--set", f"steps={STEPS}", "--set", "batch_size=8", "--set", "checkpoint_every=0"]
    done = subprocess.run(
        [*trainer.argv, *extra], env=trainer.env, cwd=trainer.cwd, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert httpx.get(f"{url}/health", timeout=10).json()["weights_version"] >= version_before + STEPS
    assert any(shared.rglob("*.safetensors")), "nothing was written to the shared volume"
    # and the server loaded them from disk (POST /weights/load), not from uploads
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    loads = re.findall(
        r'generator_weight_loads_total\{(?=[^}]*outcome="ok")(?=[^}]*source="disk")[^}]*\} (\S+)', metrics
    )
    assert loads and float(loads[0]) >= STEPS, metrics


# ----------------------------------------------------------------------------------------------------------
# the entrypoint's own errors (no server needed)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "env", "message"),
    [
        ("generator", {"MODEL": "/nonexistent/model"}, "is not a model folder"),
        ("trainer", {"MODEL": "/nonexistent/model"}, "is not a model folder"),
        ("bogus", {}, "usage: online-dpo-entrypoint generator|trainer"),
    ],
)
def test_entrypoint_explains_a_bad_setting(role, env, message):
    compose = load_compose(example_env())
    image = service_image(compose, "trainer-cpu")
    script = executable_path(image, image.entrypoint[0])
    done = subprocess.run([str(script), role], env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------------------------
# several generation replicas: compose.replicas.yaml on top of compose.yaml
# ----------------------------------------------------------------------------------------------------------
REPLICAS_FILE = ROOT / "compose.replicas.yaml"


def merge_compose(base, override):
    """What ``docker compose -f base -f override`` reads: mappings merged key by key, sequences appended,
    anything else replaced (compose's merge rules, for the keys these files use)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge_compose(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


def test_replicas_override_adds_a_second_generator_that_the_trainer_uses(tmp_path):
    from trainer_client.config import load_config

    env = example_env()
    written = yaml.safe_load(REPLICAS_FILE.read_text())
    validator = compose_schema_validator()
    for data in (written, interpolate(written, env)):
        assert not [f"{e.json_path}: {e.message}" for e in validator.iter_errors(data)]
    merged = merge_compose(load_compose(env), interpolate(written, env))
    assert selected_services(merged, [], env) == {"generator", "generator-2", "trainer"}
    assert selected_services(merged, ["cpu"], env) == {"generator-cpu", "trainer-cpu"}
    services = merged["services"]
    one, two = services["generator"], services["generator-2"]
    # the same server (image, model, key, settings, volumes, healthcheck) on another GPU and host port
    for key in ("build", "image", "volumes", "healthcheck", "shm_size", "init", "restart", "profiles"):
        assert two[key] == one[key], key
    alone = "GENERATOR_GPU_MEMORY_UTILIZATION"  # generator-2 has its GPU to itself
    assert {k: v for k, v in two["environment"].items() if k != alone} == {
        k: v for k, v in one["environment"].items() if k != alone
    }
    devices = {
        s: services[s]["deploy"]["resources"]["reservations"]["devices"][0]
        for s in ("generator", "generator-2")
    }
    assert devices["generator"]["device_ids"] == ["0"] and devices["generator-2"]["device_ids"] == ["1"]
    assert one["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:8100:8100"]
    assert two["ports"] == ["127.0.0.1:8001:8000", "127.0.0.1:8101:8100"]
    trainer = services["trainer"]
    assert trainer["depends_on"] == {
        "generator": {"condition": "service_healthy"},
        "generator-2": {"condition": "service_healthy"},
    }
    url = trainer["environment"]["GENERATOR_URL"]
    assert url == "http://generator:8000,http://generator-2:8000"

    # the entrypoint hands both URLs to server_url as a list (and evaluates through the first one)
    image = service_image(merged, "trainer")
    script = executable_path(image, image.entrypoint[0])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls, bin_dir = tmp_path / "calls.txt", tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trainer-client"  # records its arguments instead of training
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done >>"$CALLS"\necho ---- >>"$CALLS"\n')
    fake.chmod(0o755)
    config_path = config_file(merged, "trainer")
    run_env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "MODEL": str(model),
        "GENERATOR_URL": url, "TRAINER_CONFIG": str(config_path), "RUN_DIR": str(tmp_path / "run"),
        "WEIGHTS_PUSH": "auto", "EVAL_TASK": "arithmetic",
    }  # fmt: skip
    done = subprocess.run([str(script), "trainer"], env=run_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    evaluate, train, _ = [c.strip().splitlines() for c in calls.read_text().split("----")[:-1]]
    assert evaluate[evaluate.index("--server-url") + 1] == "http://generator:8000"
    overrides = [train[i + 1] for i, arg in enumerate(train) if arg == "--set"]
    config = load_config(config_path, overrides)
    assert config.server_url == ["http://generator:8000", "http://generator-2:8000"]
    # one URL, as compose.yaml alone passes it, stays a string
    calls.unlink()
    done = subprocess.run(
        [str(script), "trainer"], env={**run_env, "GENERATOR_URL": "http://generator:8000", "EVAL_TASK": ""},
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    train = calls.read_text().split("----")[0].strip().splitlines()
    assert 'server_url="http://generator:8000"' in train


# ----------------------------------------------------------------------------------------------------------
# compose v1 and the host-network override that services/smoke.sh runs the cpu profile with
# ----------------------------------------------------------------------------------------------------------
HOST_NETWORK_FILE = ROOT / "services" / "compose.host-network.yaml"


def test_compose_file_uses_nothing_that_compose_v1_rejects_or_ignores():
    """docker-compose 1.29 refuses a top-level ``name`` and ignores ``configs`` outside a swarm (the trainer
    would silently run the config baked into its image); smoke.sh runs ``docker-compose config`` for real."""
    for data in (load_compose(), yaml.safe_load(REPLICAS_FILE.read_text())):
        assert {k for k in data if not k.startswith("x-")} <= {"services", "volumes"}
        assert not [name for name, service in data["services"].items() if "configs" in service]
    assert read_dotenv(ENV_EXAMPLE)["COMPOSE_PROJECT_NAME"] == "online-dpo"


def test_host_network_override_keeps_the_server_on_loopback_and_the_trainer_pointed_at_it():
    env = example_env(GENERATOR_HOST_PORT="8123")
    written = yaml.safe_load(HOST_NETWORK_FILE.read_text())
    validator = compose_schema_validator()
    for data in (written, interpolate(written, env)):
        assert not [f"{e.json_path}: {e.message}" for e in validator.iter_errors(data)]
    merged = merge_compose(load_compose(env), interpolate(written, env))
    assert set(written["services"]) == {"generator-cpu", "trainer-cpu"}  # the cpu profile only
    services = merged["services"]
    for name in ("generator-cpu", "trainer-cpu"):
        assert services[name]["network_mode"] == "host" and services[name]["build"]["network"] == "host"
        assert services[name]["build"]["args"] == {"VARIANT": "cpu"}  # build args stay compose.yaml's
    generator = services["generator-cpu"]["environment"]
    assert generator["GENERATOR_HOST"] == "127.0.0.1" and generator["GENERATOR_PORT"] == "8123"
    assert services["trainer-cpu"]["environment"]["GENERATOR_URL"] == "http://127.0.0.1:8123"
    assert selected_services(merged, ["cpu"], env) == {"generator-cpu", "trainer-cpu"}
