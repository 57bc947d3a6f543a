"""The chunk HTTP API inside `vllm serve`: a vLLM endpoint plugin (`vllm.endpoint_plugins`).

    POST   /v1/chunks             {"text" | "token_ids", "kind", "label", "parent"} -> the chunk
    GET    /v1/chunks             -> {"object": "list", "data": [chunks], "stats": {...}}
    GET    /v1/chunks/{id}        -> the chunk
    DELETE /v1/chunks/{id}        -> {"id", "object": "chunk.deleted", "deleted": true}
    POST   /v1/completions        vLLM's, plus an optional "chunks": [ids]: the prompt is then
                                  those chunks' stored tokens followed by "prompt" (text or ids)
    POST   /v1/chat/completions   vLLM's, plus an optional "chunks": [ids]: the prompt is then
                                  those chunks' stored tokens followed by the chat-templated
                                  "messages" (templated and tokenized by vLLM, as without chunks)

Chunk tokens are never tokenized again: a composed prompt is token ids throughout. A chunk shows
`"status": "registering"` until its prefill is done and its pages are pinned, then `"ready"`.
`GET /v1/chunks` carries the registry's stats and how many composed chunk tokens vLLM's prefix
cache served (`reused_tokens`, `chunk_reuse_rate`, measured from each request's
`num_cached_tokens`).

With the setting `chunk_persistence_dir`, chunks are saved, forgotten and reloaded as by ChunkStore
(chunks/persist.py's ChunkPersistence, run in a worker thread): a new server lists the saved
chunks as `"ready"`, their pages back in vLLM's prefix cache without prefill.

Errors are JSON `{"error": {"message", "type", "code"}}`:
400 malformed body; 404 unknown or deleted chunk; 409 the chunk changed state under the request
(deleted while its registration runs, or evicted before its pages were pinned); 413 composition
(or chunk) longer than the model's context, or registry / page budget full. vLLM loads endpoint
plugins only when named in `VLLM_PLUGINS`; `vllm-cascade serve` names this one (and the plugin's
others) when the variable is unset. Same semantics as the Python API (chunks/store.py), on
vLLM's async engine client.

    curl -s localhost:8000/v1/chunks -d '{"text": "You are a careful assistant.", "kind": "system"}'
    curl -s localhost:8000/v1/completions -d '{"model": M, "chunks": ["<id>"], "prompt": "Q: ...", "max_tokens": 32}'
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from vllm_cascade import vllm_compat
from vllm_cascade.chunks.layout import ComposedPrompt
from vllm_cascade.chunks.persist import ChunkFiles, ChunkPersistence, fingerprint
from vllm_cascade.chunks.registry import Chunk, ChunkError, UnknownChunk
from vllm_cascade.chunks.store import (
    ChunkConflict,
    ChunksUnavailable,
    ChunkSpec,
    chunk_json,
    chunk_stats,
    composition_prompt,
    count_composition,
    encode_text,
    make_registry,
    new_counters,
    present_output,
    register_spec,
    registration,
    with_composition,
)

logger = logging.getLogger(__name__)

PLUGIN_NAME = "cascade_chunks"
ACTIVE_SERVICE: ChunkService | None = None  # this API server's, for /metrics (metrics.py)
_SPEC_FIELDS = {"text": str, "token_ids": list, "kind": str, "label": str, "parent": str}
# The request being served, for the hooks in vLLM's serving path (vllm_compat.hook_compositions).
COMPOSITION: ContextVar[Composition | None] = ContextVar("cascade_composition", default=None)


class ChunkService:
    """Chunks for one API server: the registry here, pages pinned in the engine core."""

    def __init__(self, engine_client: Any, total_pages: int, problem: str | None = None) -> None:
        """`problem`: why this engine cannot hold chunks (the engine core's cascade_chunk_problem);
        registrations are then refused with it (501) before anything is prefilled."""
        config = engine_client.vllm_config
        self.problem = problem
        self.engine = engine_client
        self.max_model_len = config.model_config.max_model_len
        self._unpin: list[int] = []  # pages the registry let go, handed back after each operation
        self.registry = make_registry(config, total_pages, on_free=self._unpin.extend, on_remove=self._forget)
        # Chunks whose prefill and pinning are under way -> the error that ended them (None: fine).
        self._registering: dict[str, asyncio.Future[BaseException | None]] = {}
        self.counters = new_counters()
        self.persistence: ChunkPersistence | None = None  # once `start_persistence` ran

    async def start_persistence(self, directory: str) -> None:
        """Save chunks to `directory` from now on, and reload the chunks saved there (no prefill;
        rejected files are computed again), as ChunkStore does. Persistence blocks on engine-core
        calls, so it runs in a worker thread that hands each call to this event loop."""
        loop = asyncio.get_running_loop()

        def call_engine_core(method: str, *args: Any) -> Any:
            call = vllm_compat.call_engine_core_async(self.engine, method, *args)
            return asyncio.run_coroutine_threadsafe(call, loop).result()

        def register_chunks(specs: list[ChunkSpec]) -> list[dict]:
            return [asyncio.run_coroutine_threadsafe(self.register(spec), loop).result() for spec in specs]

        layout = await vllm_compat.call_engine_core_async(self.engine, "cascade_kv_layout")
        files = ChunkFiles(directory, fingerprint(self.engine.vllm_config, self.registry.model_fingerprint, layout))
        self.persistence = ChunkPersistence(files, self.registry, self.counters, call_engine_core, register_chunks)
        try:
            await asyncio.to_thread(self.persistence.reload)
        finally:
            await self.flush()

    def _forget(self, chunk: Chunk) -> None:
        if self.persistence is not None:
            self.persistence.forget(chunk)

    async def register(self, spec: ChunkSpec) -> dict:
        from vllm import SamplingParams

        if self.problem is not None:
            raise ChunksUnavailable(self.problem)
        own = list(spec.token_ids) if spec.token_ids is not None else self.tokenize(spec.text)
        chunk, created = register_spec(self.registry, spec, own, self.max_model_len)
        if not created:
            pending = self._registering.get(chunk.chunk_id)
            if pending is not None:  # the same content, registered by a request still running
                failed = await asyncio.shield(pending)
                if failed is not None:
                    raise ChunkConflict(f"registering chunk {chunk.chunk_id} failed in a concurrent request "
                                        f"({type(failed).__name__}: {failed}); register it again")
            return self.json(chunk)
        done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._registering[chunk.chunk_id] = done
        error: BaseException | None = None
        try:
            parent = self._registering.get(chunk.parent) if chunk.parent else None
            if parent is not None and await asyncio.shield(parent) is not None:
                raise ChunkConflict(f"the parent chunk {chunk.parent} failed to register; register both again")
            prompt, valid = registration(self.registry, chunk, self.max_model_len)
            params = with_composition(SamplingParams(max_tokens=1, temperature=0.0), prompt)
            async for _ in self.engine.generate({"prompt_token_ids": prompt.token_ids}, params,
                                                f"cascade-chunk-{uuid.uuid4().hex}"):
                pass
            pages = await vllm_compat.call_engine_core_async(self.engine, "cascade_pin_chunk", chunk.chunk_id,
                                                             prompt.token_ids, prompt.refs, valid)
            try:
                self.registry.attach_pages(chunk.chunk_id, pages)
            except UnknownChunk:  # removed meanwhile (deletion waits for us): nothing may keep the pins
                self._unpin.extend(pages)
                raise ChunkConflict(f"chunk {chunk.chunk_id} was removed while it was being registered (evicted "
                                    "by newer chunks, or its parent's registration failed); register it again"
                                    ) from None
            self.counters["prefilled_chunk_tokens"] += len(chunk.own_token_ids)
            if self.persistence is not None:
                await asyncio.to_thread(self.persistence.save, chunk)  # a failure is logged: the chunk stays
        except BaseException as exc:
            error = exc
            self._discard(chunk)
            raise
        finally:
            if self._registering.get(chunk.chunk_id) is done:  # not a re-registration after an eviction
                del self._registering[chunk.chunk_id]
            done.set_result(error)
            await self.flush()
        return self.json(chunk)

    def _discard(self, chunk: Chunk) -> None:
        """A failed registration keeps nothing: the chunk goes, with the chunks registered on it
        meanwhile (cascade: their pages are unpinned, their own registrations end with 409). Never
        raises, so that the registration's own error is what its client gets."""
        if chunk.deleted:
            return
        try:
            self.registry.delete(chunk.chunk_id, cascade=True)
        except Exception:  # e.g. already gone: nothing of it is left to unpin
            logger.exception("chunk %s: removing it after its registration failed", chunk.chunk_id)

    async def delete(self, chunk_id: str) -> None:
        if chunk_id in self._registering:
            raise ChunkConflict(f"chunk {chunk_id} is still being registered; delete it once its POST returned")
        self.registry.delete(chunk_id)
        await self.flush()

    def compose(self, ids: list[str]) -> Composition:
        """Hold the chunks for one request (404 if one is unknown); release with `Composition.release`."""
        return Composition(self, self.registry.acquire(ids))

    def json(self, chunk: Chunk) -> dict:
        return {**chunk_json(chunk), "status": "registering" if chunk.chunk_id in self._registering else "ready"}

    def stats(self) -> dict:
        return chunk_stats(self.registry, self.counters)

    async def flush(self) -> None:
        if self._unpin:
            pages, self._unpin[:] = list(self._unpin), []
            await vllm_compat.call_engine_core_async(self.engine, "cascade_unpin_pages", pages)

    def tokenize(self, text: str | None) -> list[int]:
        return encode_text(self.engine.get_tokenizer(), text)


class Composition:
    """One request's chunks, held from `ChunkService.compose` until `release`."""

    def __init__(self, service: ChunkService, chunks: list[Chunk]) -> None:
        self.service = service
        self.chunks = chunks
        self.prompt: ComposedPrompt | None = None  # once composed
        self._observed = False
        # Runs once: from `release`, or when the composition is dropped unreleased (a stream that
        # was never read, e.g. its client left first); freed pages are then unpinned at the next flush.
        self._release = weakref.finalize(self, service.registry.release, [c.chunk_id for c in chunks])
        self._release.atexit = False

    def compose(self, tail: list[int] | None) -> list[int]:
        """The prompt's token ids: the chunks' stored tokens, each on its own pages, then `tail` (413
        if it does not fit the context). `extra_args` says vLLM where the chunks are."""
        if tail is None:
            raise ChunkError("chunks compose with text and token prompts only, not images, audio or embeddings")
        prompt = composition_prompt(self.chunks, tail, self.service.registry.page_size, self.service.max_model_len)
        if self.prompt is not None and self.prompt.refs != prompt.refs:
            raise ChunkError("a composed chat needs messages after its chunks")
        self.prompt = prompt
        return prompt.token_ids

    @property
    def extra_args(self) -> dict:
        """vLLM's `vllm_xargs` for the composition (a tail follows the chunks: chat, or a non-empty prompt)."""
        prompt = self.prompt or composition_prompt(self.chunks, [0], self.service.registry.page_size, 1 << 62)
        return prompt.extra_args

    def observe(self, output: Any) -> Any:
        """Count the request's reuse from its first output (vLLM has prefilled it by then); -> the
        output as the client sees it (`present_output`: no pad slots)."""
        if self.prompt is None:
            return output
        if not self._observed:
            self._observed = True
            count_composition(self.service.counters, self.prompt, output.num_cached_tokens)
        return present_output(output, self.prompt)

    async def release(self) -> None:
        self._release()
        await self.service.flush()


def _error(exc: Exception, status: int | None = None) -> JSONResponse:
    code = status or getattr(exc, "status", 400)
    return JSONResponse({"error": {"message": str(exc), "type": type(exc).__name__, "code": code}}, code)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ChunkError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ChunkError("the body must be a JSON object")
    return body


def _spec(body: dict) -> ChunkSpec:
    unknown = set(body) - set(_SPEC_FIELDS)
    if unknown:
        raise ChunkError(f"unknown fields {sorted(unknown)}; a chunk takes {sorted(_SPEC_FIELDS)}")
    for name, kind in _SPEC_FIELDS.items():
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise ChunkError(f"{name!r} must be a {kind.__name__}")
    if (body.get("text") is None) == (body.get("token_ids") is None):
        raise ChunkError("give exactly one of 'text' and 'token_ids'")
    if body.get("token_ids") is not None and not all(isinstance(t, int) and t >= 0 for t in body["token_ids"]):
        raise ChunkError("'token_ids' must be non-negative integers")
    return ChunkSpec(body.get("text"), body.get("token_ids"), body.get("kind") or "context", body.get("label"),
                     body.get("parent"))


def _service(request: Request) -> ChunkService:
    return request.app.state.cascade_chunks


# -- OpenAPI: the bodies are parsed by hand (for the messages above); their schemas are declared here.

_CHUNK_IDS_SCHEMA = {
    "type": "array", "items": {"type": "string"},
    "description": "Chunk ids (from POST /v1/chunks), in order: their stored tokens start the prompt.",
}
_CHUNK_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "description": "The chunk's text (tokenized once); or give token_ids."},
        "token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "kind": {"type": "string", "default": "context", "description": "'system', 'context' or any label"},
        "label": {"type": "string"},
        "parent": {"type": "string", "description": "Register in the context of this chunk (a chain)."},
    },
}


_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}}}},
}


def _errors(**described: str) -> dict:
    """FastAPI `responses` for the errors a route answers with (`_error`'s body): e.g. e404="..."."""
    return {int(code[1:]): {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for code, text in described.items()}


_COMPOSITION_ERRORS = _errors(e400="Malformed body or 'chunks'", e404="Unknown or deleted chunk",
                              e413="The composition is longer than the model's context")


def _body_schema(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _with_chunks_schema(vllm_request: str, prompt: str) -> dict:
    return _body_schema({
        "type": "object", "additionalProperties": True, "properties": {"chunks": _CHUNK_IDS_SCHEMA},
        "description": f"vLLM's {vllm_request}; with 'chunks', the prompt is the chunks' tokens, then {prompt}.",
    })


router = APIRouter(tags=["chunks"])


@router.post("/v1/chunks", summary="Register a chunk (prefilled once, its KV pages pinned)",
             openapi_extra=_body_schema(_CHUNK_SCHEMA),
             responses=_errors(e400="Malformed body", e404="Unknown parent chunk",
                               e409="The chunk or its parent changed state meanwhile (deleted, evicted, its "
                                    "registration failed)",
                               e413="Chunk longer than the context, or the registry or its page budget is full",
                               e501="This engine cannot hold chunks"))
async def create_chunk(request: Request):
    try:
        return JSONResponse(await _service(request).register(_spec(await _json_body(request))))
    except ChunkError as exc:
        return _error(exc)


@router.get("/v1/chunks", summary="List the chunks, with the registry's stats and the measured reuse")
async def list_chunks(request: Request):
    service = _service(request)
    return {"object": "list", "data": [service.json(c) for c in service.registry.list()], "stats": service.stats()}


@router.get("/v1/chunks/{chunk_id}", summary="One chunk", responses=_errors(e404="Unknown or deleted chunk"))
async def get_chunk(chunk_id: str, request: Request):
    service = _service(request)
    try:
        return service.json(service.registry.get(chunk_id))
    except UnknownChunk as exc:
        return _error(exc)


@router.delete("/v1/chunks/{chunk_id}", summary="Delete a chunk (its pages are freed when no request uses it)",
               responses=_errors(e404="Unknown or deleted chunk",
                                 e409="Chunks are registered on it, or it is still being registered"))
async def delete_chunk(chunk_id: str, request: Request):
    try:
        await _service(request).delete(chunk_id)
    except ChunkError as exc:
        return _error(exc)
    return {"id": chunk_id, "object": "chunk.deleted", "deleted": True}


def _completion_prompt(body: dict, composition: Composition) -> None:
    """/v1/completions: "prompt" is the tail; the composed token ids replace it."""
    tail = body.get("prompt", "")
    if isinstance(tail, str):
        tail_ids = composition.service.tokenize(tail) if tail else []
    elif isinstance(tail, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tail):
        tail_ids = list(tail)
    else:
        raise ChunkError("with 'chunks', 'prompt' is one text or one list of token ids (the tail)")
    body["prompt"] = composition.compose(tail_ids)


def _composition_args(body: dict, composition: Composition) -> None:
    """Where the chunks are, for the engine core (vllm_compat.ComposedBlockHasher), with the client's own xargs."""
    xargs = body.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise ChunkError("'vllm_xargs' must be an object")
    body["vllm_xargs"] = {**xargs, **composition.extra_args}


async def _serve(request: Request, endpoint: tuple[Any, Any], build: Callable[[dict, Composition], None] | None):
    """Run vLLM's route `endpoint` (function, request model) on the body; with "chunks", as a
    composition: the chunks are held until the response (or its stream) ends, `build` puts the
    composed prompt into the body (chat: vLLM's rendering does, through the hook)."""
    create, request_model = endpoint
    try:
        body = await _json_body(request)
        ids = body.pop("chunks", None)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise ChunkError("'chunks' must be a list of chunk ids")
        composition = _service(request).compose(ids) if ids is not None else None
    except ChunkError as exc:
        return _error(exc)
    token = COMPOSITION.set(composition)
    streaming = False
    try:
        if composition is not None:
            if build is not None:
                build(body, composition)
            _composition_args(body, composition)
        response = await create(request=request_model(**body), raw_request=request)
        if composition is not None and isinstance(response, StreamingResponse):
            response.body_iterator = _release_after(response.body_iterator, composition)
            streaming = True
        return response
    except ChunkError as exc:
        return _error(exc)
    except ValidationError as exc:
        return _error(exc, 400)
    finally:
        COMPOSITION.reset(token)
        if composition is not None and not streaming:
            await composition.release()


async def _release_after(stream: AsyncIterator, composition: Composition) -> AsyncIterator:
    try:
        async for part in stream:
            yield part
    finally:
        await composition.release()


async def completions_with_chunks(request: Request):
    """vLLM's /v1/completions; with "chunks", the prompt is those chunks' tokens + "prompt"."""
    return await _serve(request, vllm_compat.completion_endpoint(), _completion_prompt)


async def chat_completions_with_chunks(request: Request):
    """vLLM's /v1/chat/completions; with "chunks", the prompt is those chunks' tokens + the
    chat-templated messages."""
    return await _serve(request, vllm_compat.chat_endpoint(), None)


class ChunkEndpoints:
    """The `vllm.endpoint_plugins` entry point."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_api_route("/v1/completions", completions_with_chunks, methods=["POST"], tags=["chunks"],
                          summary="vLLM's completions, with an optional 'chunks' composition",
                          openapi_extra=_with_chunks_schema("CompletionRequest", "'prompt' (the tail)"),
                          responses=_COMPOSITION_ERRORS)
        app.add_api_route("/v1/chat/completions", chat_completions_with_chunks, methods=["POST"], tags=["chunks"],
                          summary="vLLM's chat completions, with an optional 'chunks' composition",
                          openapi_extra=_with_chunks_schema("ChatCompletionRequest",
                                                            "the chat-templated 'messages'"),
                          responses=_COMPOSITION_ERRORS)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is not None:
            pages = await vllm_compat.call_engine_core_async(engine_client, "cascade_kv_pages")
            problem = await vllm_compat.call_engine_core_async(engine_client, "cascade_chunk_problem")
            global ACTIVE_SERVICE
            service = ChunkService(engine_client, pages["total"], problem)
            from vllm_cascade.config import CascadeConfig

            directory = CascadeConfig.from_vllm(engine_client.vllm_config).chunk_persistence_dir
            if directory and problem is None:
                await service.start_persistence(directory)
            elif problem is not None:
                logger.warning("chunk API: registrations will be refused: %s", problem)
            state.cascade_chunks = ACTIVE_SERVICE = service
            vllm_compat.hook_compositions(state, COMPOSITION)
