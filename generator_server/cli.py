"""``generator-server`` (also ``python -m generator_server``): parse the flags, then serve.

Flags are parsed before vLLM or torch is imported, so ``--help`` and flag errors answer at once. Every
flag can also come from an environment variable ``GENERATOR_<FLAG>`` (a flag given wins).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import types
import typing

from pydantic import ValidationError

from generator_server.config import ServerSettings
from generator_server.gguf_model import GGUFError, is_gguf, resolve_model


def _flag_type(annotation) -> tuple[type | None, list | None]:
    """(argparse type, choices) for a settings field annotation such as ``int | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return None, list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    return annotation, None


def build_parser() -> argparse.ArgumentParser:
    """One ``--flag-name`` per settings field; defaults stay unset so environment variables still apply."""
    parser = argparse.ArgumentParser(
        prog="generator-server",
        description="Serve one model with vLLM: batched /generate and in-place weight reloads over HTTP.",
        epilog="Every flag can also be set as GENERATOR_<FLAG>, e.g. GENERATOR_API_KEY.",
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        notes = ["required"] if field.is_required() else []
        if field.default is not None and not field.is_required():
            notes.append(f"default {field.default}")
        notes.append(f"env GENERATOR_{name.upper()}")
        help_text = f"{field.description} [{'; '.join(notes)}]"
        if field.annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        flag_type, choices = _flag_type(field.annotation)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("flag_type") == "text":  # a number or a word ('off'): the settings' validator reads it
            flag_type = None
        parser.add_argument(
            flag,
            type=str if flag_type is None or choices else flag_type,
            choices=choices,
            default=argparse.SUPPRESS,
            metavar=None if choices else extra.get("metavar", name.upper()),
            help=help_text,
        )
    return parser


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Settings from flags, then ``GENERATOR_*`` variables, then defaults; exits 2 on invalid values, and
    on a server that would listen beyond loopback without an API key (:func:`unsafe_listen_refusal`)."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    try:
        settings = ServerSettings(**flags)
    except ValidationError as e:
        problems = "; ".join(
            f"--{'.'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}"
            if err["loc"]
            else err["msg"]
            for err in e.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits
    refusal = unsafe_listen_refusal(settings)
    if refusal:
        parser.error(refusal)
    return settings


def is_loopback(host: str) -> bool:
    """``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1); any other name counts as remote."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def unsafe_listen_refusal(settings: ServerSettings) -> str | None:
    """Why the server must not start as configured (listening beyond loopback with no API key and no
    explicit consent), or None."""
    if is_loopback(settings.host) or settings.api_key or settings.allow_unauthenticated_remote:
        return None
    return (
        f"--host {settings.host} listens beyond loopback, and without --api-key anyone who reaches it could "
        "push weights. Set --api-key KEY (or GENERATOR_API_KEY), or listen on 127.0.0.1, or, to serve "
        "without a key on purpose, pass --allow-unauthenticated-remote."
    )


def describe_listen(settings: ServerSettings) -> tuple[int, str]:
    """(log level, line) saying where the server listens and whether it needs a key, logged at start."""
    scheme = "https" if settings.ssl_certfile else "http"
    where = f"listening on {scheme}://{settings.host}:{settings.port}"
    if settings.api_key:
        return logging.INFO, f"{where}; every endpoint but /health requires the API key"
    if is_loopback(settings.host):
        return logging.INFO, f"{where} (loopback only) without an API key"
    return logging.WARNING, (
        f"{where} WITHOUT AN API KEY (--allow-unauthenticated-remote): anyone who can reach this port can "
        "generate and replace the served weights"
    )


def describe_pushes(settings: ServerSettings) -> str:
    """The line, logged at start, that says how new weights can reach this server and what a faster way
    would take."""
    if settings.stream_port is not None:
        where = "a free port" if settings.stream_port == 0 else f"port {settings.stream_port}"
        return (
            f"pushes: PUT /weights, and the stream port ({where}, named by GET /weights; a trainer's push: "
            "auto takes it), which carries weights unencrypted: --stream-port off turns it off"
        )
    why = "--ssl-certfile: it has no TLS" if settings.ssl_certfile else "--stream-port off"
    return (
        f"pushes: PUT /weights only ({why}); the stream port receives about twice as fast on the CPU "
        "(docs/TRANSPORTS.md)"
    )


def with_gguf_converted(settings: ServerSettings) -> ServerSettings:
    """``--model FILE.gguf``: the settings with ``model`` the file's converted folder (converted on first
    use, then cached: generator_server/gguf_model.py), so the engine, the checks of pushed weights and the
    /v1 endpoints all read an ordinary model folder. The /v1 model name stays the file as given (unless
    --served-model-name says otherwise). Other settings are returned as they are.

    Runs before the HTTP server is set up, so its log lines get a handler of their own meanwhile."""
    if not is_gguf(settings.model):
        return settings
    package_log = logging.getLogger("generator_server")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # (uvicorn's look)
    package_log.addHandler(handler)
    level = package_log.level
    package_log.setLevel(settings.log_level.upper())
    try:
        folder = resolve_model(settings.model)
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(level)
    return settings.model_copy(
        update={"model": folder, "served_model_name": settings.served_model_name or settings.model}
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    given_model = settings.model
    try:
        settings = with_gguf_converted(settings)
    except GGUFError as e:
        print(f"generator-server: error: --model: {e}", file=sys.stderr)
        return 2
    # vLLM starts its engine processes while the HTTP server's threads run; spawning (rather than forking
    # a multi-threaded process) is the safe choice on CPU and GPU alike.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    import uvicorn

    from generator_server.app import create_app

    server: uvicorn.Server | None = None
    failed = False

    def on_fatal() -> None:
        """The engine could not start: stop serving and exit non-zero rather than answer 503 forever."""
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=30,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    server_log = logging.getLogger("uvicorn.error")  # uvicorn.Config set up its handler
    server_log.log(*describe_listen(settings))
    server_log.info(describe_pushes(settings))
    if given_model != settings.model:
        server_log.info("serving the GGUF file %s, converted into %s", given_model, settings.model)
    # this package's own log lines (swaps, refusals, timeouts) go where uvicorn's go, at the same level
    package_log = logging.getLogger("generator_server")
    package_log.handlers, package_log.propagate = list(logging.getLogger("uvicorn").handlers), False
    package_log.setLevel(settings.log_level.upper())
    server = uvicorn.Server(config)
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
