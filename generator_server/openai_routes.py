"""The OpenAI-compatible routes (see ``openai_api``): vLLM's OpenAI serving classes bound to the running
``AsyncLLM`` (no second engine) do the protocol (streaming, ``n``, ``logprobs``, ``seed``, ``stop``,
``return_token_ids``, chat templates). Around them these routes keep the server's promises: the API key,
the weights read lock held for a request's whole life (a stream's last chunk included), so an answer comes
from one weights version, named in the ``X-Weights-Version`` header (and a ``weights_version`` field of
JSON answers), and the request limits of ``/generate``.

Works with vLLM 0.26 and 0.32, whose module layouts differ in a few places (see the imports). No
``from __future__ import annotations`` here: the route functions go through vLLM's ``with_cancellation``
wrapper, and older FastAPI versions resolve string annotations in the wrapper's module, not this one.
"""

import logging
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.renderers.online_renderer import OnlineRenderer

try:  # vLLM >= 0.27
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelList
except ImportError:  # vLLM 0.26
    from vllm.entrypoints.openai.engine.protocol import ErrorResponse, ModelList

from generator_server.auth import require_api_key
from generator_server.config import ServerSettings
from generator_server.engine import GenerationEngine
from generator_server.errors import ApiError
from generator_server.openai_api import OpenAIErrors
from generator_server.routes import get_engine
from online_dpo_protocol import VERSION_HEADER

log = logging.getLogger(__name__)


@dataclass
class OpenAIServing:
    """vLLM's OpenAI serving objects, bound to one running engine."""

    models: OpenAIServingModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat

    @classmethod
    def build(cls, engine: GenerationEngine, settings: ServerSettings) -> "OpenAIServing":
        llm = engine.llm
        name = settings.served_model_name or settings.model
        models = ServedModels(
            engine_client=llm, base_model_paths=[BaseModelPath(name=name, model_path=settings.model)]
        )
        # Only arguments that vLLM 0.26 and 0.32 both take; the rest keep their defaults.
        renderer = OnlineRenderer(
            llm.model_config,
            llm.renderer,
            request_logger=None,
            chat_template=None,  # the tokenizer's own
            chat_template_content_format="auto",
        )
        if hasattr(renderer, "warmup"):  # vLLM >= 0.27 renders a first chat to load the template early
            renderer.warmup()
        completion = Completions(llm, models, online_renderer=renderer, request_logger=None)
        completion.engine = engine
        chat = Chats(
            llm,
            models,
            "assistant",
            online_renderer=renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        chat.engine = engine
        return cls(models=models, completion=completion, chat=chat)


class ServedModels(OpenAIServingModels):
    """vLLM's models, named by the served model's name even when a version's LoRA adapter answers."""

    def model_name(self, lora_request=None) -> str:
        return self.base_model_paths[0].name


class ServedAdapter:
    """For vLLM's serving classes: a request for the served model runs with the LoRA adapter of the version
    it holds (``--enable-lora``; none otherwise). ``_answer`` holds the weights for the request's whole life,
    so the engine's adapter is that version's. (``_maybe_get_adapters`` is where vLLM 0.26 and 0.32 both
    pick a request's adapter.)"""

    engine: GenerationEngine

    def _maybe_get_adapters(self, request, supports_default_mm_loras: bool = False):
        return super()._maybe_get_adapters(request, supports_default_mm_loras) or self.engine.adapter


class Completions(ServedAdapter, OpenAIServingCompletion):
    pass


class Chats(ServedAdapter, OpenAIServingChat):
    pass


class VLLMErrors(OpenAIErrors):
    """OpenAI errors, and vLLM's own status for what it raises (its request checks raise
    ``VLLMValidationError``, a 400; in vLLM 0.26 a ``ValueError``, which pydantic already turns into one)."""

    def other_error(self, request: Request, error: Exception) -> Response:
        answer = OpenAIServingCompletion.create_error_response(error)
        if answer.error.code >= 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return JSONResponse(answer.model_dump(), status_code=answer.error.code)


router = APIRouter(route_class=VLLMErrors, dependencies=[Depends(require_api_key)], tags=["OpenAI"])


def _serving(request: Request) -> tuple[GenerationEngine, OpenAIServing]:
    """The engine and its OpenAI serving objects, while the engine serves (503 when it cannot)."""
    return get_engine(request), request.app.state.openai


def _responses(answer_model: type) -> dict[int | str, dict[str, Any]]:
    """What a generating route answers, for the schema. The routes return responses themselves (no
    response_model): vLLM's ``with_cancellation`` returns None for a client that left."""
    return {
        200: {"model": answer_model, "content": {"text/event-stream": {}}},
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "no such model: send one /v1/models lists"},
        413: {"model": ErrorResponse, "description": "more prompts or completions than this server takes"},
        503: {"model": ErrorResponse, "description": "the engine is starting or holds no whole version"},
    }


class CompletionAnswer(CompletionResponse):
    weights_version: int
    """Version of the weights that generated every choice (also the ``X-Weights-Version`` header)."""


class ChatCompletionAnswer(ChatCompletionResponse):
    weights_version: int
    """Version of the weights that generated every choice (also the ``X-Weights-Version`` header)."""


@router.get("/v1/models", responses={200: {"model": ModelList}})
async def list_models(request: Request):
    """The one model this server serves (``--served-model-name``, default ``--model``)."""
    _, serving = _serving(request)
    return JSONResponse((await serving.models.show_available_models()).model_dump())


@router.post("/v1/completions", responses=_responses(CompletionAnswer))
@with_cancellation
async def create_completion(body: CompletionRequest, raw_request: Request):
    """OpenAI completions (vLLM's implementation and extra parameters); ``stream`` for server-sent events."""
    engine, serving = _serving(raw_request)
    _check_size(engine.settings, _prompt_count(body.prompt, body.prompt_embeds), body.n or 1)
    return await _answer(engine, serving.completion.create_completion, body, raw_request)


@router.post("/v1/chat/completions", responses=_responses(ChatCompletionAnswer))
@with_cancellation
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request):
    """OpenAI chat completions with the model's chat template; ``stream`` for server-sent events."""
    engine, serving = _serving(raw_request)
    _check_size(engine.settings, 1, body.n or 1)
    return await _answer(engine, serving.chat.create_chat_completion, body, raw_request)


def _prompt_count(prompt, prompt_embeds) -> int:
    """Prompts in a completions request: a string, a list of token ids, or a list of either."""
    if prompt is None:
        return len(prompt_embeds) if isinstance(prompt_embeds, list) else 1
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return 1
    return len(prompt)


def _check_size(settings: ServerSettings, prompts: int, n: int) -> None:
    """The limits ``/generate`` has (413 naming the flag), so no request is larger through /v1."""
    if prompts > settings.max_prompts:
        raise ApiError(
            413, f"{prompts} prompts in one request; this server takes at most {settings.max_prompts} "
            "(--max-prompts): split the batch",
        )  # fmt: skip
    if n * prompts > settings.max_completions:
        raise ApiError(
            413, f"n={n} x {prompts} prompts = {n * prompts} completions in one request; this server takes "
            f"at most {settings.max_completions} (--max-completions): split the batch",
        )  # fmt: skip


async def _answer(engine: GenerationEngine, create, body, raw_request: Request):
    """Run ``create(body, raw_request)`` holding the weights; a stream holds them until its last chunk."""
    held = AsyncExitStack()
    version = await held.enter_async_context(engine.weights_held())
    headers = {VERSION_HEADER: str(version)}
    try:
        result = await create(body, raw_request)
    except BaseException:
        await held.aclose()
        raise
    if isinstance(result, ErrorResponse):
        await held.aclose()
        return JSONResponse(result.model_dump(), status_code=result.error.code, headers=headers)
    if not isinstance(result, AsyncGenerator):
        await held.aclose()
        return JSONResponse({**result.model_dump(), "weights_version": version}, headers=headers)
    return HeldStream(result, held, headers=headers, media_type="text/event-stream")


class HeldStream(StreamingResponse):
    """Server-sent events that release the weights when the stream ends, however it ends (finished,
    failed, or the client gone)."""

    def __init__(self, chunks: AsyncGenerator[str, None], held: AsyncExitStack, **kwargs):
        super().__init__(chunks, **kwargs)
        self.chunks = chunks
        self.held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.chunks.aclose()  # the engine aborts a request whose stream closes early
            finally:
                await self.held.aclose()
