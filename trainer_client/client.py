"""A small typed Python client for the generation server's HTTP contract.

    from trainer_client.client import GeneratorClient

    with GeneratorClient("http://127.0.0.1:8000", api_key="...") as client:
        print(client.health().weights_version)
        out = client.generate(prompts=["Hello"], n=2, max_tokens=16, seed=0)
        print(out.results[0].completions[0].text)
        client.push_weights(model.state_dict(), version=1)

Every call has a timeout. Connection errors, timeouts and 5xx answers are retried with exponential backoff
(``max_retries`` times); a 4xx answer is never retried and raises :class:`GeneratorHTTPError` carrying the
server's message. It depends on httpx and pydantic only; ``push_weights`` also needs torch and safetensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# Response types (the server's contract)
# ---------------------------------------------------------------------------------------------------------
class Health(BaseModel):
    status: str
    model: str
    weights_version: int
    vllm_version: str
    device: str


class Completion(BaseModel):
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: Literal["stop", "length"] | str


class PromptResult(BaseModel):
    prompt_token_ids: list[int]
    completions: list[Completion]


class GenerateResponse(BaseModel):
    weights_version: int
    results: list[PromptResult]


class TensorSpec(BaseModel):
    shape: list[int]
    dtype: str


class PushTarget(BaseModel):
    """Where the server runs and which weight transports it accepts (``GET /weights``)."""

    transports: list[str] = ["http"]
    """``http`` always; ``shared`` with a checkpoint root; ``ipc`` when its engine is on a CUDA GPU."""
    host_id: str | None = None
    """Identity of the server's host (its kernel boot id): CUDA IPC needs the trainer on the same one."""
    gpu_uuid: str | None = None
    """UUID of the GPU the server's engine runs on (None on CPU)."""


class WeightsSpec(PushTarget):
    weights_version: int
    tensors: dict[str, TensorSpec]


class WeightsUpdate(BaseModel):
    weights_version: int
    bytes: int | None = None
    load_seconds: float | None = None


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
class GeneratorError(RuntimeError):
    """Base class of the errors this client raises."""


class GeneratorUnavailable(GeneratorError):
    """The server could not be reached (or kept answering 5xx) after all retries."""


class GeneratorHTTPError(GeneratorError):
    """The server answered with an error status; ``detail`` is its message."""

    def __init__(self, status_code: int, detail: str, method: str, path: str):
        self.status_code, self.detail, self.method, self.path = status_code, detail, method, path
        super().__init__(f"{method} {path} -> {status_code}: {detail}")


class StaleVersionError(GeneratorHTTPError):
    """409: the pushed version is not greater than the version the server serves."""


def _detail(response: httpx.Response) -> str:
    """The server's error message: FastAPI's ``detail`` (a string or a list of field errors) or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # pydantic validation errors: name the fields
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(x) for x in err.get("loc", []) if x != "body")
                parts.append(f"{loc}: {err.get('msg', err)}" if loc else str(err.get("msg", err)))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


# ---------------------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------------------
class GeneratorClient:
    """Client of one generation server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer KEY`` when set.
        timeout: seconds for one request (connect, read and write each); generation and pushes of big
            models need minutes.
        max_retries: retries after a connection error, a timeout or a 5xx answer (0 = try once).
        backoff: seconds before the first retry, doubled after each one, capped at ``backoff_max``.
        transport: an httpx transport to use instead of the network (for tests).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        backoff_max: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff, backoff_max
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, retries: int | None = None, **kwargs) -> httpx.Response:
        """Send one request, retrying transport errors and 5xx; raise on 4xx and on exhausted retries.

        A ``content`` that is a callable is called anew for every attempt (a fresh body stream)."""
        retries = self.max_retries if retries is None else retries
        delay = self.backoff
        for attempt in range(retries + 1):
            send = dict(kwargs)
            if callable(send.get("content")):
                send["content"] = send["content"]()
            try:
                response = self._http.request(method, path, **send)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if attempt == retries:
                    raise GeneratorUnavailable(
                        f"{method} {self.base_url}{path} failed after {attempt + 1} attempt(s): {problem}"
                    ) from e
            else:
                if response.status_code < 400:
                    return response
                detail = _detail(response)
                if response.status_code < 500:
                    error = StaleVersionError if response.status_code == 409 else GeneratorHTTPError
                    raise error(response.status_code, detail, method, path)
                problem = f"{response.status_code}: {detail}"
                if attempt == retries:
                    if response.status_code == 503:
                        raise GeneratorUnavailable(f"{method} {self.base_url}{path} -> {problem}")
                    raise GeneratorHTTPError(response.status_code, detail, method, path)
            log.warning("%s %s: %s; retry %d/%d in %.1fs", method, path, problem, attempt + 1, retries, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
        raise AssertionError("unreachable")

    # --- endpoints -------------------------------------------------------------------------------------
    def health(self, retries: int | None = None) -> Health:
        """``GET /health``; a 503 (engine still starting) is retried like any 5xx."""
        return Health.model_validate(self._request("GET", "/health", retries=retries).json())

    def wait_until_ready(self, timeout: float = 300.0, poll: float = 1.0) -> Health:
        """Poll ``/health`` until the engine is ready or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health(retries=0)
            except GeneratorUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll)

    def generate(
        self,
        prompts: list[str] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_tokens: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        ignore_eos: bool = False,
    ) -> GenerateResponse:
        """``POST /generate`` for exactly one of ``prompts`` or ``prompt_token_ids``."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        body: dict[str, Any] = dict(
            n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_tokens=min_tokens, stop=stop, seed=seed, logprobs=logprobs, ignore_eos=ignore_eos,
        )  # fmt: skip
        if prompts is not None:
            body["prompts"] = list(prompts)
        else:
            body["prompt_token_ids"] = [list(ids) for ids in prompt_token_ids]
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=body).json())

    def weights_spec(self) -> WeightsSpec:
        """``GET /weights``: the served version and the tensor names, shapes and dtypes a push must hold."""
        return WeightsSpec.model_validate(self._request("GET", "/weights").json())

    def push_weights_file(self, path: str | Path, version: int, sha256: str | None = None) -> WeightsUpdate:
        """``PUT /weights?version=V``: stream a safetensors file, its SHA-256 in ``X-Weights-SHA256``."""
        path = Path(path)
        size = path.stat().st_size
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "X-Weights-SHA256": sha256 or sha256_file(path),
        }
        response = self._request(
            "PUT",
            "/weights",
            params={"version": version},
            headers=headers,
            content=lambda: _file_chunks(path),
        )
        return WeightsUpdate.model_validate(response.json())

    def push_weights(
        self, state_dict: Mapping[str, Any], version: int, tmp_dir: str | Path | None = None
    ) -> WeightsUpdate:
        """Write ``state_dict`` (name -> tensor) as safetensors in ``tmp_dir``, push it as ``version``."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=tmp_dir)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            return self.push_weights_file(tmp, version)
        finally:
            os.unlink(tmp)

    def load_weights(self, path: str, version: int) -> WeightsUpdate:
        """``POST /weights/load``: reload from a file or folder on the server's own disk."""
        response = self._request("POST", "/weights/load", json={"path": str(path), "version": version})
        return WeightsUpdate.model_validate(response.json())

    # --- CUDA IPC transfer sessions (see trainer_client/transports/ipc.py) -------------------------------
    def ipc_begin(self, version: int, host_id: str, gpu_uuid: str, tensors: list[dict]) -> str:
        """``POST /weights/ipc/begin``: open a transfer session for ``version`` (the whole manifest is
        checked first); returns the session id."""
        body = {"version": version, "host_id": host_id, "gpu_uuid": gpu_uuid, "tensors": tensors}
        return self._request("POST", "/weights/ipc/begin", json=body).json()["session"]

    def ipc_bucket(self, session: str, handle: dict, tensors: list[dict]) -> int:
        """``POST /weights/ipc/{session}/bucket``: the server loads the bucket's tensors and lets go of the
        buffer before it answers. Returns the number of tensors received so far."""
        body = {"handle": handle, "tensors": tensors}
        return self._request("POST", f"/weights/ipc/{session}/bucket", json=body).json()["tensors_received"]

    def ipc_commit(self, session: str) -> WeightsUpdate:
        """``POST /weights/ipc/{session}/commit``: serve the new version (every tensor must have arrived)."""
        return WeightsUpdate.model_validate(self._request("POST", f"/weights/ipc/{session}/commit").json())

    def ipc_abort(self, session: str) -> None:
        """``DELETE /weights/ipc/{session}``: give up; the server goes back to the version it served."""
        self._request("DELETE", f"/weights/ipc/{session}", retries=0)

    def metrics(self) -> str:
        """``GET /metrics`` (Prometheus text format)."""
        return self._request("GET", "/metrics").text
