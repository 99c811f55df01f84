"""Unit tests of the server's parts that need no engine: safetensors checks, the lock, settings, routes
before the engine is up."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save_file

from generator_server.app import create_app
from generator_server.cli import parse_settings
from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.mapped_weights import MappedWeights
from generator_server.metrics import ServerMetrics
from generator_server.rwlock import ReadersWriterLock
from generator_server.weights import (
    TORCH_NAMES,
    TensorInfo,
    WeightStore,
    check_compatible,
    read_safetensors_header,
)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


# --- safetensors checks -----------------------------------------------------------------------------------
def test_header_of_a_valid_file(tmp_path):
    path = _write(
        tmp_path / "w.safetensors", {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    )
    assert read_safetensors_header(path) == {"a": TensorInfo("F32", (2, 3)), "b": TensorInfo("BF16", (4,))}


@pytest.mark.parametrize("cut", [1, 7, 8, 20, -1, -8])
def test_truncated_file_is_refused(tmp_path, cut):
    data = _write(tmp_path / "w.safetensors", {"a": torch.zeros(16, 16)}).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(ApiError) as e:
        read_safetensors_header(path)
    assert e.value.status_code == 400


def test_trailing_bytes_are_refused(tmp_path):
    path = _write(tmp_path / "w.safetensors", {"a": torch.zeros(4)})
    path.write_bytes(path.read_bytes() + b"\0" * 4)
    with pytest.raises(ApiError, match="trailing bytes"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not match"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "malformed"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 8,
            "starts at byte",
        ),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_inconsistent_headers_are_refused(tmp_path, header, data, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ApiError, match=message):
        read_safetensors_header(path)


def test_not_json_header(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[" + b"\0" * 8)
    with pytest.raises(ApiError, match="not JSON"):
        read_safetensors_header(path)


def test_compatibility_names_every_problem():
    expected = {"w": TensorInfo("F32", (2, 2)), "v": TensorInfo("F32", (3,)), "u": TensorInfo("F32", (1,))}
    found = {"w": TensorInfo("BF16", (2, 2)), "v": TensorInfo("F32", (4,)), "x": TensorInfo("F32", (1,))}
    with pytest.raises(ApiError) as e:
        check_compatible(found, expected, optional={})
    message = e.value.message
    assert "missing tensors: 'u'" in message and "unknown tensors: 'x'" in message
    assert "'v' has shape [4], expected [3]" in message
    assert "'w'" not in message  # a different floating dtype is fine: the engine casts


def test_compatibility_dtype_cast_and_optional_tensors():
    expected = {"w": TensorInfo("F32", (2, 2))}
    check_compatible({"w": TensorInfo("F16", (2, 2))}, expected, optional={})
    optional = {"head": TensorInfo("F32", (2, 2))}
    check_compatible({"w": TensorInfo("F32", (2, 2)), "head": TensorInfo("F32", (2, 2))}, expected, optional)
    with pytest.raises(ApiError, match="'w' is I64, expected F32"):
        check_compatible({"w": TensorInfo("I64", (2, 2))}, expected, optional={})


# --- readers-writer lock ----------------------------------------------------------------------------------
def test_writer_waits_for_readers_and_holds_back_new_ones():
    async def scenario() -> list[str]:
        lock, events = ReadersWriterLock(), []

        async def reader(name: str, delay: float, hold: float) -> None:
            await asyncio.sleep(delay)
            async with lock.read():
                events.append(f"{name} start")
                await asyncio.sleep(hold)
                events.append(f"{name} end")

        async def writer() -> None:
            await asyncio.sleep(0.01)
            async with lock.write():
                events.append("write start")
                await asyncio.sleep(0.05)
                events.append("write end")

        await asyncio.gather(reader("r1", 0, 0.1), writer(), reader("r2", 0.03, 0.01))
        return events

    events = asyncio.run(scenario())
    # r1 was running: the write waits for it; r2 arrived while the write waited: it runs after the write.
    assert events == ["r1 start", "r1 end", "write start", "write end", "r2 start", "r2 end"]


def test_cancelled_writer_releases_held_back_readers():
    async def scenario() -> bool:
        lock = ReadersWriterLock()
        async with lock.read():
            writer = asyncio.create_task(_hold(lock.write()))
            await asyncio.sleep(0.01)
            writer.cancel()
            await asyncio.sleep(0.01)
            await asyncio.wait_for(_hold(lock.read(), seconds=0), timeout=1)
            return True

    assert asyncio.run(scenario())


async def _hold(context, seconds: float = 10) -> None:
    async with context:
        await asyncio.sleep(seconds)


# --- settings ---------------------------------------------------------------------------------------------
def test_flags_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GENERATOR_API_KEY", "from-env")
    monkeypatch.setenv("GENERATOR_PORT", "9001")
    settings = parse_settings(["--model", str(tmp_path), "--port", "9002", "--enforce-eager"])
    assert settings.api_key == "from-env"  # environment fills what the flags leave out
    assert settings.port == 9002  # a flag wins over the environment
    assert settings.enforce_eager is True and settings.dtype == "auto"
    assert settings.stream_port == 0  # on by default, on a free port
    monkeypatch.setenv("GENERATOR_STREAM_PORT", "8100")
    assert parse_settings(["--model", str(tmp_path)]).stream_port == 8100
    assert parse_settings(["--model", str(tmp_path), "--stream-port", "off"]).stream_port is None
    monkeypatch.setenv("GENERATOR_STREAM_PORT", "")  # compose's way to turn it off
    assert parse_settings(["--model", str(tmp_path)]).stream_port is None


def test_bad_flag_value_exits_with_the_field_name(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_settings(["--model", str(tmp_path), "--gpu-memory-utilization", "1.5"])
    assert e.value.code == 2
    assert "--gpu-memory-utilization" in capsys.readouterr().err


# --- HTTP before the engine is up (no engine at all: the lifespan is not run) -------------------------------
def test_health_and_generate_answer_503_until_the_engine_is_ready(tmp_path):
    app = create_app(parse_settings(["--model", str(tmp_path)]))
    client = TestClient(app)  # not entered as a context manager: no lifespan, so no engine
    assert client.get("/health").status_code == 503
    response = client.post("/generate", json={"prompts": ["hi"]})
    assert response.status_code == 503 and "starting" in response.json()["detail"]


def test_api_key_is_checked_before_anything_else(tmp_path):
    app = create_app(parse_settings(["--model", str(tmp_path), "--api-key", "k"]))
    client = TestClient(app)
    assert client.get("/health").status_code == 503  # open, not ready
    assert client.get("/weights").status_code == 401
    assert client.get("/weights", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/weights", headers={"Authorization": "Bearer k"}).status_code == 503


# --- a reload the engine itself fails (a fake engine: vLLM does not fail on checked files) ---------------
class FakeReloadEngine:
    """Fake stand-in for AsyncLLM with just the reload calls; fails to load folders whose path contains any
    of ``fail_for``."""

    errored = False

    def __init__(self, fail_for: list[str]):
        self.fail_for = fail_for
        self.loaded: list[str] = []
        self.paused = False
        self.methods: set[str] = set()

    async def pause_generation(self) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    async def reset_prefix_cache(self) -> None:
        pass

    async def collective_rpc(self, method: str, kwargs: dict) -> list[dict]:
        assert self.paused
        self.methods.add(method)
        if method == "receiver_load_files":  # (an engine on a GPU)
            path = str(Path(kwargs["paths"][0]).parent)
        else:
            assert method == "reload_weights"
            path = kwargs["weights_path"]
        if any(f in path for f in self.fail_for):
            raise RuntimeError(f"cannot load {path}")
        self.loaded.append(path)
        return [{"seconds": 0.0, "bytes": 0, "locked_bytes": 0}]

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("gpu_uuid", [None, "GPU-fake"])  # vLLM reads the files / the worker maps them
def test_failed_engine_reload_restores_the_weights_served_before(tmp_path, gpu_uuid):
    model_dir, work_dir = tmp_path / "model", tmp_path / "work"
    model_dir.mkdir()
    _write(model_dir / "model.safetensors", {"w": torch.zeros(2, 2)})
    engine = GenerationEngine(
        parse_settings(["--model", str(model_dir), "--work-dir", str(work_dir)]), ServerMetrics()
    )
    engine.gpu_uuid = gpu_uuid
    fake = engine._llm = FakeReloadEngine(fail_for=["served-v1"])

    def staged(value: float) -> Path:
        folder = engine.store.new_staging_dir()
        _write(folder / "model.safetensors", {"w": torch.full((2, 2), value)})
        return folder

    async def scenario() -> None:
        with pytest.raises(ApiError) as e:
            await engine.update_weights(staged(1.0), 10, version=1, source="upload")
        assert e.value.status_code == 500 and "still serving version 0" in e.value.message
        assert engine.version == 0 and fake.loaded == [str(model_dir.resolve())]  # the model folder again
        assert list(work_dir.iterdir()) == [] and not fake.paused

        fake.fail_for = ["served-v3"]
        await engine.update_weights(staged(2.0), 10, version=2, source="upload")
        with pytest.raises(ApiError):
            await engine.update_weights(staged(3.0), 10, version=3, source="upload")
        assert engine.version == 2 and fake.loaded[-1] == str(work_dir / "served-v2")
        assert [p.name for p in work_dir.iterdir()] == ["served-v2"]

        fake.fail_for = ["served-v4", "served-v2"]  # and restoring fails too: the server stops serving
        with pytest.raises(ApiError, match="restoring the previous weights"):
            await engine.update_weights(staged(4.0), 10, version=4, source="upload")
        assert not engine.ready
        assert fake.methods == {"receiver_load_files" if gpu_uuid else "reload_weights"}

    asyncio.run(scenario())


def test_server_exits_non_zero_when_the_engine_cannot_start(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model folder without weights
    result = subprocess.run(
        [sys.executable, "-m", "generator_server", "--model", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no .safetensors file" in result.stderr


# --- POST /weights/load staging: hard link, copy as fallback ----------------------------------------------
def test_load_stages_a_hard_link_that_survives_the_source_being_replaced(tmp_path):
    store = WeightStore(tmp_path / "model", tmp_path / "work", max_upload_bytes=1 << 20)
    source = _write(tmp_path / "ckpt.safetensors", {"w": torch.ones(4)})
    staged, size = store.copy_in(source)
    file = staged / "model.safetensors"
    assert size == source.stat().st_size and file.stat().st_ino == source.stat().st_ino  # no bytes copied
    # the trainer's shared push: write a temporary file, rename it over the old name, later delete it
    _write(tmp_path / ".ckpt.tmp", {"w": torch.zeros(4)}).rename(source)
    source.unlink()
    assert read_safetensors_header(file)["w"] == TensorInfo("F32", (4,))
    with safe_open(str(file), framework="pt") as f:
        assert f.get_tensor("w").tolist() == [1.0] * 4


def test_load_copies_where_linking_fails(tmp_path, monkeypatch):
    def cross_device(src, dst, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("generator_server.weights.os.link", cross_device)
    store = WeightStore(tmp_path / "model", tmp_path / "work", max_upload_bytes=1 << 20)
    folder = tmp_path / "sharded"
    folder.mkdir()
    _write(folder / "a.safetensors", {"a": torch.ones(2)})
    _write(folder / "b.safetensors", {"b": torch.ones(3)})
    staged, size = store.copy_in(folder)
    assert sorted(p.name for p in staged.iterdir()) == ["a.safetensors", "b.safetensors"]
    for name in ("a.safetensors", "b.safetensors"):
        assert (staged / name).read_bytes() == (folder / name).read_bytes()
        assert (staged / name).stat().st_ino != (folder / name).stat().st_ino
    assert size == sum((folder / n).stat().st_size for n in ("a.safetensors", "b.safetensors"))
    with pytest.raises(ApiError, match="could not read"):
        store.copy_in(tmp_path / "gone.safetensors")


# --- the worker's view of a staged file ------------------------------------------------------------------
def test_mapped_file_tensors_equal_the_saved_ones(tmp_path):
    """Every dtype the server accepts, tensors at offsets their dtype does not divide (a bf16 tensor of odd
    length before an f32 one; a header of unpadded length), and an empty tensor: read back exactly, as views
    of the mapping. (``save_file`` would sort and align them: the file is written here in this order.)"""
    saved = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),  # 30 bytes: what follows is not 4-byte aligned
        "b.f32": torch.randn(7),
        "c.empty": torch.zeros(0, 4),
        "d.i64": torch.arange(5),
        "e.f8": torch.randn(9).to(torch.float8_e4m3fn),
        "f.bool": torch.tensor([True, False, True]),
        "g.f16": torch.randn(2).half(),
        "h.u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
    }
    codes = {getattr(torch, name): code for code, name in TORCH_NAMES.items()}
    header, data = {}, b""
    for name, tensor in saved.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape)}
        header[name]["data_offsets"] = [len(data), len(data) + len(raw)]
        data += raw
    _raw_file(tmp_path / "model.safetensors", header, data)
    assert header["b.f32"]["data_offsets"][0] % 4 != 0
    weights = MappedWeights(lock=False)
    file = weights.open(tmp_path / "model.safetensors")
    loaded = dict(file.tensors())
    assert list(loaded) == list(saved)  # in the order they are stored
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name
    del loaded
    weights.done([file])
    assert file.fd == -1 and weights._locked == []  # nothing locked on a CPU: the mapping went with the load


def test_cpu_kv_cache_is_bounded_by_default(monkeypatch):
    """With no flag and no VLLM_CPU_KVCACHE_SPACE the CPU engine's KV cache is an eighth of the memory,
    1 to 4 GiB, instead of vLLM's 85%: a trainer on the same machine keeps the rest. A flag or vLLM's own
    variable, when given, decides."""
    from generator_server.engine import cpu_kv_cache_gib

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    auto = cpu_kv_cache_gib(None)
    assert 1 <= auto <= 4 and auto <= max(1, total_gib / 8)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert cpu_kv_cache_gib(None) == 3
    assert cpu_kv_cache_gib(0.5) == 0.5  # the flag wins over the variable


def test_cpu_dtype_is_float32_without_native_bfloat16(monkeypatch):
    """A bf16 model folder (a converted GGUF file) on a CPU without AVX512-BF16 or AMX is computed in
    float32, where vLLM's CPU kernels are fast; an explicit --dtype is always kept."""
    from generator_server import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert engine.cpu_dtype("auto") == "float32"
    assert engine.cpu_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert engine.cpu_dtype("auto") == "auto"
