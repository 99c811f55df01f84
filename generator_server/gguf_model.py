"""GGUF files in: turn a ``.gguf`` file into a Hugging Face model folder, once, and cache it by content.

Why a conversion rather than serving the file as it is: the server checks every weight push against the
served folder's safetensors (names, shapes, dtypes), vLLM's in-place reloads write dense tensors, and the
trainer trains dense float weights. A GGUF file (usually quantized) offers none of that. transformers can
read and dequantize GGUF files of a set of architectures, so the file is read once, written as an ordinary
folder (config, tokenizer with its chat template, bf16 safetensors), and both the server and the trainer use
that folder from then on; each reads the same cache entry, so both see the same weights.

    folder = resolve_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # ~/.cache/online-dpo/gguf/<sha>-<stem>/

Only the standard library is imported here at module level: ``generator-server --help`` and
``trainer-client --help`` stay instant; torch, transformers and gguf are imported inside the functions that
use them. This module must never import ``trainer_client`` (the trainer imports it, not the other way).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("generator_server")

INSTALL_HINT = "pip install 'online-dpo-server[gguf]'"
"""What to run when the packages that read GGUF files are missing."""
DTYPES = ("bfloat16", "float16", "float32")
"""Dtypes a converted folder can be written in."""
SOURCE_FILE = "gguf_source.json"
"""Written into a converted folder: which file it came from (name, SHA-256), for whoever finds the folder."""
_CHUNK_BYTES = 8 * 2**20
_RESOLVED: dict[tuple[str, int, int], str] = {}
"""(real path, size, mtime) of a GGUF file -> its converted folder, so one process hashes a file once even
when the learner, the colocated engine and the evaluation each resolve it."""


class GGUFError(ValueError):
    """A GGUF file that cannot be turned into a model folder; the message says what to do about it."""


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix; a folder so named is a model folder)."""
    text = os.fspath(path)
    return text.lower().endswith(".gguf") and not os.path.isdir(text)


def cache_root() -> Path:
    """Where converted models are kept: ``$ONLINE_DPO_CACHE``, else ``~/.cache/online-dpo``."""
    return Path(os.environ.get("ONLINE_DPO_CACHE") or Path.home() / ".cache" / "online-dpo").expanduser()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content (hex), read in chunks so a many-GiB file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def cached_folder(file: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """The cache folder of ``file``'s conversion: ``<cache>/gguf/<first 16 hex of SHA-256>-<stem>``.

    Keyed by content, not by path: a file moved or copied is not converted again, and a file replaced by
    another of the same name is. The stem is only there for people reading the cache."""
    file = Path(file)
    return cache_root() / "gguf" / f"{(sha256 or file_sha256(file))[:16]}-{file.stem}"


def resolve_model(path: str) -> str:
    """A model argument as the loaders need it: a ``.gguf`` file becomes its converted folder (converted on
    first use, then cached); anything else (a folder, a Hub name) is returned unchanged.

    Safe to call from several processes at once (a trainer and the server it starts, or several ranks):
    one converts while the others wait for it, then all read the same folder."""
    if not is_gguf(path):
        return path
    file = _existing_file(path)
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    known = _RESOLVED.get(key)
    if known is not None and Path(known).is_dir():
        return known
    sha256 = file_sha256(file)
    target = cached_folder(file, sha256)
    if not target.is_dir():
        try:
            with _conversion_lock(target):
                if not target.is_dir():  # (another process may have converted it while we waited)
                    log.info("converting the GGUF file %s into %s (once: the folder is cached)", file, target)
                    started = time.monotonic()
                    convert_gguf(file, target, sha256=sha256)
                    log.info("converted %s in %.1f s", file.name, time.monotonic() - started)
        except OSError as e:  # (an unwritable or full cache; GGUFError is no OSError)
            raise GGUFError(
                f"cannot write the converted model into {target.parent}: {e}. Set ONLINE_DPO_CACHE to a "
                "writable folder with room for the model in bf16, or convert it with `trainer-client "
                "convert-gguf FILE --out DIR` and give DIR instead of the file"
            ) from e
    _RESOLVED[key] = str(target)
    return str(target)


def convert_gguf(
    file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "bfloat16",
    sha256: str | None = None,
) -> Path:
    """Dequantize the GGUF ``file`` into the model folder ``out_dir`` (config, tokenizer, ``dtype``
    safetensors, generation config); returns ``out_dir``.

    The folder is written under a temporary name beside ``out_dir`` and renamed into place at the end, so a
    crash never leaves a half-written folder where a model is expected. If ``out_dir`` appeared meanwhile
    (another process converted the same file), that one is kept and ours dropped. ``sha256``: the file's
    digest if the caller has it (recorded in the folder's ``gguf_source.json``)."""
    file = _existing_file(file)
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r} cannot be written; choose one of {', '.join(DTYPES)}")
    _require_packages()
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(f"{out} already exists; remove it or choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()  # (not tempfile.mkdtemp: its 0700 would keep other users, e.g. a server's, out)
    try:
        _write_folder(file, partial, dtype)
        (partial / SOURCE_FILE).write_text(
            json.dumps({"file": file.name, "sha256": sha256 or file_sha256(file), "dtype": dtype}, indent=2)
        )
        _usual_permissions(partial)
        try:
            os.rename(partial, out)  # atomic; fails if another process put a non-empty folder there first
        except OSError:
            if not (out.is_dir() and any(out.iterdir())):
                raise
            log.info("%s was written by another process meanwhile; keeping that one", out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # (gone already once renamed)
    return out


def gguf_architecture(file: str | os.PathLike[str]) -> str | None:
    """The ``general.architecture`` a GGUF file declares (e.g. ``llama``), or None if it cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(os.fspath(file)).fields.get("general.architecture")
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # a damaged file, or no gguf package: the caller reports what it has
        return None


# ---------------------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------------------
def _existing_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise GGUFError(f"GGUF file {file} not found: check the path (a .gguf file, or give a model folder)")
    return file


def _require_packages() -> None:
    """GGUFError naming the install command when ``gguf`` or ``accelerate`` is missing: transformers needs
    both to read a GGUF file, and its own errors do not say which extra of this project brings them."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFError(f"reading a GGUF file needs the package(s) {', '.join(missing)}: {INSTALL_HINT}")


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s conversion, so that a second process converting the same file
    waits for the first rather than dequantizing it again (which takes the model's size in memory twice).
    The lock is the kernel's (``flock``): a process that dies releases it. Without ``fcntl`` (Windows) no
    lock is taken; the atomic rename in :func:`convert_gguf` still keeps the folder whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting into %s; waiting for it", target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _usual_permissions(folder: Path) -> None:
    """Give the files of ``folder`` the permissions the umask gives new files (safetensors writes its file
    0600), so a cache shared by several users or containers is readable by all of them."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _supported_architectures() -> list[str]:
    """The ``general.architecture`` values this transformers can load from GGUF (both of its loaders)."""
    names: set[str] = set()
    with contextlib.suppress(Exception):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    with contextlib.suppress(Exception):
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    names.difference_update({"general", "tokenizer"})  # (metadata sections in its table, not architectures)
    return sorted(names)


def _unreadable(file: Path, error: Exception) -> GGUFError:
    """The error for a file transformers refused: says which architecture it declares and, when that is
    the reason, that transformers' GGUF loader supports only some architectures."""
    import transformers

    arch = gguf_architecture(file)
    supported = _supported_architectures()
    if arch is not None and supported and arch not in supported:
        return GGUFError(
            f"{file} declares the architecture {arch!r}, which transformers {transformers.__version__} "
            f"cannot dequantize: its GGUF loader supports only some architectures ({', '.join(supported)}). "
            f"Use the model's original Hugging Face folder (safetensors) instead, or a transformers version "
            f"that reads {arch!r} GGUF files. (transformers said: {error})"
        )
    return GGUFError(
        f"transformers {transformers.__version__} could not read {file} (architecture "
        f"{arch or 'unknown'}): {type(error).__name__}: {error}"
    )


def _write_folder(file: Path, out: Path, dtype_name: str) -> None:
    """Load ``file`` with transformers (dequantized) and save it into ``out`` as an ordinary folder.

    ``save_pretrained`` refuses a model loaded from GGUF ("quantized with GGUF, not serializable"), so the
    weights go into a fresh model built from the same config, without the GGUF quantization settings, and
    that one is saved."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    # transformers wants a folder and a file name; an absolute name, because it takes a gguf_file that exists
    # as it is, relative to the working directory, before it looks in the folder.
    where, name = str(file.resolve().parent), str(file.resolve())
    options = {}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5 may keep the blocks packed: ask for floats
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=dtype, **options)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise _unreadable(file, e) from e
    state = loaded.state_dict()
    packed = [key for key, tensor in state.items() if not tensor.is_floating_point()]
    if packed:
        raise GGUFError(
            f"transformers kept {len(packed)} tensors of {file} packed (e.g. {packed[0]}) instead of "
            "dequantizing them; upgrade transformers or convert the file with llama.cpp's tools"
        )

    config = copy.deepcopy(loaded.config)
    for key in ("quantization_config", "_model_name_or_path"):  # GGUF-specific: not part of the new folder
        config.__dict__.pop(key, None)
    config.dtype = dtype
    # Built on the meta device, then given the loaded tensors themselves (assign): no random initialisation
    # (minutes for a 7B model on a CPU) and no second copy of the weights in memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise GGUFError(f"the tensors transformers read from {file} do not fit its model class: {e}") from e
    model.tie_weights()  # (assign gave the head and the embedding the same tensor, but as two parameters)
    if getattr(config, "tie_word_embeddings", False):
        output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if output is not None and output.weight.data_ptr() != embedding.weight.data_ptr():
            raise GGUFError(f"{file}: the output head of the converted model is not tied to its embedding")
    if getattr(loaded, "generation_config", None) is not None:
        model.generation_config = loaded.generation_config
    del loaded, state
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
