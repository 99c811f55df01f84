"""``trainer-client`` (also ``python -m trainer_client``): the trainer's command line.

    trainer-client train --config FILE.yaml [--set key=value ...] [--resume CHECKPOINT_DIR]
    trainer-client convert-gguf FILE.gguf [--out DIR]   # a GGUF file as a model folder, ahead of time
    trainer-client merge-lora CHECKPOINT_DIR --out DIR  # a LoRA run's adapters merged into its base
    torchrun --nproc-per-node N -m trainer_client train --config FILE.yaml   # N ranks, FSDP2 (learner.py)

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in
``SUBCOMMANDS`` and imported only when present; the first line of ``run``'s docstring is its help.
Modules import torch inside ``run`` so that ``--help`` stays instant. Expected failures (bad config,
unreachable server, wrong server model) print one ``error: ...`` line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS: dict[str, str] = {
    "train": "trainer_client.cli",
    "eval": "trainer_client.evaluate",
    "demo": "trainer_client.demo",
    "convert-gguf": "trainer_client.convert_gguf",
    "merge-lora": "trainer_client.merge_lora",
}
"""Subcommand name -> module providing ``add_arguments(parser)`` and ``run(args) -> int``."""

EXIT_CONFIG, EXIT_SERVER, EXIT_RUNTIME = 2, 3, 1


# --- train ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``train``."""
    parser.add_argument("--config", help="YAML file of TrainConfig keys (see trainer_client/config.py)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (value parsed as YAML); repeatable",
    )  # fmt: skip
    parser.add_argument("--resume", metavar="DIR", help="checkpoint folder to continue from")
    parser.add_argument(
        "--colocate", action="store_true",
        help="run vLLM inside the trainer process on its device (same as --set mode=colocate)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Train a policy with online DPO against a generation server.

    The config is validated before torch is imported, so a bad key fails instantly."""
    from trainer_client.config import ConfigError, load_config

    try:
        overrides = [*args.overrides, "mode=colocate"] if getattr(args, "colocate", False) else args.overrides
        config = load_config(args.config, overrides)
    except ConfigError as e:
        return fail(f"bad config: {e}", EXIT_CONFIG)

    from trainer_client.client import GeneratorClient, GeneratorError

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks to the server
    if config.mode == "server" and main:  # fail fast, before torch is imported, if the server is not usable
        for url in config.server_urls:  # every replica must answer at start
            try:
                with GeneratorClient(url, config.api_key, config.request_timeout, max_retries=1) as client:
                    client.wait_until_ready(config.connect_timeout)
                    client.weights_spec()  # also checks the API key
            except GeneratorError as e:
                where = f"{url}: " if len(config.server_urls) > 1 else ""
                return fail(f"generation server: {where}{e}", EXIT_SERVER)

    from trainer_client.colocate import ColocateError
    from trainer_client.distributed import DistributedError
    from trainer_client.train import IncompatibleServerError, NotFiniteError, run_training

    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,  # the other ranks: only what goes wrong
        format=f"%(asctime)s %(levelname)s %(name)s: {rank}%(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    try:
        summary = run_training(config, resume=args.resume)
    except (ConfigError, ValueError, FileNotFoundError, NotImplementedError) as e:
        return fail(f"bad config: {e}", EXIT_CONFIG)
    except IncompatibleServerError as e:
        return fail(f"wrong server model: {e}", EXIT_SERVER)
    except GeneratorError as e:
        return fail(f"generation server: {e}", EXIT_SERVER)
    except ColocateError as e:
        return fail(f"colocated engine: {e}", EXIT_RUNTIME)
    except NotFiniteError as e:
        return fail(f"not finite: {e}", EXIT_RUNTIME)
    except DistributedError as e:
        return fail(f"distributed: {e}", EXIT_RUNTIME)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    if main:
        print(f"done: {summary['steps']} steps, final checkpoint {summary['final_checkpoint']}")
    return 0


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# --- entry point ---------------------------------------------------------------------------------------
def _available() -> dict[str, object]:
    modules = {}
    for name, module in SUBCOMMANDS.items():
        try:
            modules[name] = sys.modules[__name__] if module == __name__ else importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trainer-client", description="Online DPO against a generation server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = _available()
    for name, module in modules.items():
        doc = (module.run.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc or None)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
