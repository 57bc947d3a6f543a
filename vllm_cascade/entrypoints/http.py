"""The chunk HTTP API inside `vllm serve`: a vLLM endpoint plugin (`vllm.endpoint_plugins`).

    POST   /v1/chunks          {"text" | "token_ids", "kind", "label", "parent"} -> the chunk
    GET    /v1/chunks          -> {"object": "list", "data": [chunks], "stats": {...}}
    GET    /v1/chunks/{id}     -> the chunk
    DELETE /v1/chunks/{id}     -> {"id", "object": "chunk.deleted", "deleted": true}
    POST   /v1/completions     vLLM's, plus an optional "chunks": [ids]: the prompt is then those
                               chunks' stored tokens followed by "prompt" (text or token ids)

Errors are JSON `{"error": {"message", "type", "code"}}` with 400 (malformed body, too long),
404 (unknown or deleted chunk) or 413 (registry or page budget full). vLLM loads endpoint
plugins only when named in `VLLM_PLUGINS`; `vllm-cascade serve` names this one (and the
plugin's others) when the variable is unset. Same semantics as the Python API
(chunks/store.py), on vLLM's async engine client.

    curl -s localhost:8000/v1/chunks -d '{"text": "You are a careful assistant.", "kind": "system"}'
    curl -s localhost:8000/v1/completions -d '{"model": M, "chunks": ["<id>"], "prompt": "Q: ...", "max_tokens": 32}'
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from vllm_cascade import vllm_compat
from vllm_cascade.chunks.registry import ChunkError, UnknownChunk
from vllm_cascade.chunks.store import ChunkSpec, chunk_json, composition_prompt, make_registry, register_spec

PLUGIN_NAME = "cascade_chunks"
ACTIVE_SERVICE: "ChunkService | None" = None  # this API server's, for /metrics (metrics.py)
_SPEC_FIELDS = {"text": str, "token_ids": list, "kind": str, "label": str, "parent": str}


class ChunkService:
    """Chunks for one API server: the registry here, pages pinned in the engine core."""

    def __init__(self, engine_client: Any, total_pages: int) -> None:
        config = engine_client.vllm_config
        self.engine = engine_client
        self.max_model_len = config.model_config.max_model_len
        self._unpin: list[int] = []  # pages the registry let go, handed back after each operation
        self.registry = make_registry(config, total_pages, on_free=self._unpin.extend)

    async def register(self, spec: ChunkSpec) -> dict:
        from vllm import SamplingParams

        own = list(spec.token_ids) if spec.token_ids is not None else self.tokenize(spec.text)
        chunk, created = register_spec(self.registry, spec, own, self.max_model_len)
        if created:
            try:
                prompt = {"prompt_token_ids": list(chunk.token_ids)}
                async for _ in self.engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                                    f"cascade-chunk-{uuid.uuid4().hex}"):
                    pass
                pages = await vllm_compat.call_engine_core_async(self.engine, "cascade_pin_prefix",
                                                                 list(chunk.token_ids))
                self.registry.attach_pages(chunk.chunk_id, pages)
            except BaseException:
                self.registry.delete(chunk.chunk_id)
                raise
            finally:
                await self.flush()
        return chunk_json(chunk)

    async def delete(self, chunk_id: str) -> None:
        self.registry.delete(chunk_id)
        await self.flush()

    async def flush(self) -> None:
        if self._unpin:
            pages, self._unpin[:] = list(self._unpin), []
            await vllm_compat.call_engine_core_async(self.engine, "cascade_unpin_pages", pages)

    def tokenize(self, text: str | None) -> list[int]:
        if text is None:
            raise ChunkError("give a chunk's text or its token ids")
        return list(self.engine.get_tokenizer().encode(text, add_special_tokens=False))


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


router = APIRouter(tags=["chunks"])


@router.post("/v1/chunks", summary="Register a chunk (prefilled once, its KV pages pinned)")
async def create_chunk(request: Request):
    try:
        return JSONResponse(await _service(request).register(_spec(await _json_body(request))))
    except ChunkError as exc:
        return _error(exc)


@router.get("/v1/chunks", summary="List the chunks")
async def list_chunks(request: Request):
    registry = _service(request).registry
    return {"object": "list", "data": [chunk_json(c) for c in registry.list()], "stats": registry.stats()}


@router.get("/v1/chunks/{chunk_id}", summary="One chunk")
async def get_chunk(chunk_id: str, request: Request):
    try:
        return chunk_json(_service(request).registry.get(chunk_id))
    except UnknownChunk as exc:
        return _error(exc)


@router.delete("/v1/chunks/{chunk_id}", summary="Delete a chunk (its pages are freed when no request uses it)")
async def delete_chunk(chunk_id: str, request: Request):
    try:
        await _service(request).delete(chunk_id)
    except UnknownChunk as exc:
        return _error(exc)
    return {"id": chunk_id, "object": "chunk.deleted", "deleted": True}


async def completions_with_chunks(request: Request):
    """vLLM's /v1/completions; with "chunks", the prompt is those chunks' tokens + "prompt"."""
    create_completion, completion_request = vllm_compat.completion_endpoint()
    try:
        body = await _json_body(request)
    except ChunkError as exc:
        return _error(exc)
    ids = body.pop("chunks", None)
    if ids is None:
        try:
            parsed = completion_request(**body)
        except ValidationError as exc:
            return _error(exc, 400)
        return await create_completion(request=parsed, raw_request=request)
    service = _service(request)
    try:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ChunkError("'chunks' must be a list of chunk ids")
        tail = body.get("prompt", "")
        if isinstance(tail, str):
            tail_ids = service.tokenize(tail) if tail else []
        elif isinstance(tail, list) and all(isinstance(t, int) for t in tail):
            tail_ids = list(tail)
        else:
            raise ChunkError("with 'chunks', 'prompt' is one text or one list of token ids (the tail)")
        chunks = service.registry.acquire(ids)
    except ChunkError as exc:
        return _error(exc)
    release = True
    try:
        body["prompt"], _ = composition_prompt(chunks, tail_ids, service.max_model_len)
        parsed = completion_request(**body)
        response = await create_completion(request=parsed, raw_request=request)
        if isinstance(response, StreamingResponse):  # hold the chunks until the stream ends
            response.body_iterator = _release_after(response.body_iterator, service, ids)
            release = False
        return response
    except ChunkError as exc:
        return _error(exc)
    except ValidationError as exc:
        return _error(exc, 400)
    finally:
        if release:
            service.registry.release(ids)
            await service.flush()


async def _release_after(stream, service: ChunkService, ids: list[str]):
    try:
        async for part in stream:
            yield part
    finally:
        service.registry.release(ids)
        await service.flush()


class ChunkEndpoints:
    """The `vllm.endpoint_plugins` entry point."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_api_route("/v1/completions", completions_with_chunks, methods=["POST"], tags=["chunks"],
                          summary="vLLM's completions, with an optional 'chunks' composition")

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if engine_client is not None:
            pages = await vllm_compat.call_engine_core_async(engine_client, "cascade_kv_pages")
            global ACTIVE_SERVICE
            state.cascade_chunks = ACTIVE_SERVICE = ChunkService(engine_client, pages["total"])
