"""End to end with `vllm-cascade serve ... --attention-backend cascade` (vLLM's own CLI).

Starts the OpenAI-compatible server on 127.0.0.1 (vLLM's default compilation
mode, unlike the eager `LLM` tests), sends a completion and a chat
completion, compares the greedy tokens with vLLM's CPU_ATTN backend run
offline, exercises the chunk API (registration, compositions in completions
and chat completions, errors 400/404/409/413, the OpenAPI schema), stops the
server with SIGINT and checks, from the counters written inside the worker,
that CASCADE served the requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from conftest import STATS_ENV, assert_plugin_ran

HOST = "127.0.0.1"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path, n: int = 60) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The running server: (base url, Popen, stats dir, log path). Always killed at the end."""
    with running_server(tiny_model, tmp_path_factory.mktemp("server")) as running:
        yield running


@contextlib.contextmanager
def running_server(tiny_model, work, cascade_config: dict | None = None):
    """Start a server (settings `cascade_config` added to the test's), wait for /health; always
    killed at the end. -> (base url, Popen, stats dir, log path)."""
    stats_dir = work / "stats"
    stats_dir.mkdir(parents=True)
    log_path = work / "server.log"
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm_cascade.entrypoints.cli", "serve", str(tiny_model),
        "--attention-backend", "cascade",
        "--host", HOST, "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024",
        "--block-size", "16", "--max-num-seqs", "8",  # default compilation: not eager
        "--additional-config", json.dumps({"cascade": {"min_saved_pages": 1, "min_saved_fraction": 0.0,
                                                       **(cascade_config or {})}}),
    ]  # fmt: skip
    env = {**os.environ, STATS_ENV: str(stats_dir)}
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before /health answered:\n{tail(log_path)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"/health did not answer within {START_TIMEOUT_S} s:\n{tail(log_path)}")
            time.sleep(1)
        yield url, proc, stats_dir, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the engine core and worker too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        log.close()


def post(url: str, route: str, body: dict) -> dict:
    r = requests.post(f"{url}{route}", json=body, timeout=120)
    assert r.status_code == 200, f"{route}: {r.status_code} {r.text[:2000]}"
    return r.json()


PROMPT = "The quick brown fox jumps over the lazy dog while the farmer"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Can you tell me a story about a brave mouse?"},
]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}


def test_completion(server, reference_engine):
    url, _, _, _ = server
    body = post(url, "/v1/completions", {"model": server_model(url), "prompt": PROMPT, **GREEDY})
    choice = body["choices"][0]
    assert choice["text"].strip(), body
    from vllm import SamplingParams

    ref = reference_engine.llm.generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    assert choice["prompt_token_ids"] == list(ref.prompt_token_ids)
    assert choice["token_ids"] == list(ref.outputs[0].token_ids), (choice, ref.outputs[0])
    assert choice["text"] == ref.outputs[0].text


def test_chat_completion(server, reference_engine):
    url, _, _, _ = server
    body = post(url, "/v1/chat/completions", {"model": server_model(url), "messages": MESSAGES, **GREEDY})
    choice = body["choices"][0]
    assert choice["message"]["content"].strip(), body
    from vllm import SamplingParams

    ref = reference_engine.llm.chat(
        MESSAGES, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    assert body["prompt_token_ids"] == list(ref.prompt_token_ids)
    assert choice["token_ids"] == list(ref.outputs[0].token_ids), (choice, ref.outputs[0])


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    sample = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_show_cascade_levels_and_saved_bytes(server):
    """Requests sharing a prefix cascade; /metrics (vLLM's own endpoint) shows it."""
    url, _, stats_dir, _ = server
    from vllm_cascade.stats import read_stats_dir, summarize

    prefix = " ".join([PROMPT] * 8)  # several 16-token pages shared by all four prompts
    prompts = [f"{prefix} and then number {i} said" for i in range(4)]
    post(url, "/v1/completions", {"model": server_model(url), "prompt": prompts, **GREEDY, "max_tokens": 16})
    time.sleep(0.5)  # workers write their last counters within 0.25 s
    text = requests.get(f"{url}/metrics", timeout=30).text
    files = summarize(read_stats_dir(str(stats_dir)))
    assert metric(text, "vllm:cascade_steps_total") == files["steps"] > 0
    assert sum(metric(text, "vllm:cascade_steps_by_levels_total", f'levels="{n}"') for n in (2, 3)) > 0, text
    assert metric(text, "vllm:cascade_level_pages_total", 'level="0"') > 0
    for level, queries in files["level_queries"].items():  # every query attends its own level, some a shared one
        assert metric(text, "vllm:cascade_level_queries_total", f'level="{level}"') == queries
    assert files["level_queries"]["0"] > 0 and files["level_queries"]["own"] >= files["level_queries"]["0"]
    assert metric(text, "vllm:cascade_layer_calls_total", 'path="torch"') > 0
    assert metric(text, "vllm:cascade_build_seconds_total") > 0
    kinds = files["steps_by_kind"]
    assert kinds.get("decode", 0) > 0 and kinds.get("prefill", 0) > 0 and sum(kinds.values()) == files["steps"]
    assert sum(files["build_ns_by_kind"].values()) == files["build_ns"]
    assert metric(text, "vllm:cascade_build_seconds_by_kind_total", 'kind="decode"') > 0
    # The CPU runner has no block-table mirror, so nothing is reused here; the GPU runs count them.
    assert metric(text, "vllm:cascade_merge_inputs_total") == files["merge_inputs"] > 0
    # The CPU path times its merges: every layer call of a cascade step.
    assert metric(text, "vllm:cascade_merge_timed_calls_total") == files["merge_timed_calls"] > 0
    assert metric(text, "vllm:cascade_merge_seconds_total") == pytest.approx(files["merge_ns"] / 1e9)
    assert files["merge_ns"] > 0
    assert "vllm:cascade_decode_plans_reused_total" in text and "vllm:cascade_decode_worklists_advanced_total" in text
    assert metric(text, "vllm:cascade_decode_plans_reused_total") == files["plans_reused"]
    assert metric(text, "vllm:cascade_decode_worklists_advanced_total") == files["worklists_advanced"]
    read, flat = metric(text, "vllm:cascade_kv_bytes_read_total"), metric(text, "vllm:cascade_kv_bytes_flat_total")
    assert 0 < read < flat and metric(text, "vllm:cascade_kv_bytes_saved_total") == flat - read
    assert "vllm:num_requests_running" in text  # the same endpoint as vLLM's own metrics


def test_chunk_api_registers_composes_and_deletes(server, tiny_model):
    """POST/GET/DELETE /v1/chunks and /v1/completions with "chunks", over a real server."""
    from test_e2e_llm import window

    url, _, _, _ = server
    chunk_ids, tail = window(tiny_model, 100, 120), window(tiny_model, 900, 6)
    chunk = post(url, "/v1/chunks", {"token_ids": chunk_ids, "kind": "system", "label": "doc-1"})
    assert chunk["num_tokens"] == 120 and chunk["pinned_pages"] == chunk["num_pages"] == 8  # the last page padded
    assert post(url, "/v1/chunks", {"token_ids": chunk_ids})["id"] == chunk["id"]  # same content, same chunk
    listed = requests.get(f"{url}/v1/chunks", timeout=10).json()
    assert [c["id"] for c in listed["data"]] == [chunk["id"]] and listed["stats"]["pages_pinned"] == 8

    model = server_model(url)
    composed = post(url, "/v1/completions", {"model": model, "chunks": [chunk["id"]], "prompt": tail, **GREEDY})
    plain = post(url, "/v1/completions", {"model": model, "prompt": chunk_ids + tail, **GREEDY})
    # The chunk's page padding is not shown, nor counted: usage counts the composition's tokens.
    assert composed["choices"][0]["prompt_token_ids"] == chunk_ids + tail
    assert composed["usage"]["prompt_tokens"] == len(chunk_ids + tail) == plain["usage"]["prompt_tokens"]
    assert composed["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    assert requests.get(f"{url}/v1/chunks/{chunk['id']}", timeout=10).json()["holders"] == 0

    text = requests.get(f"{url}/metrics", timeout=30).text
    assert metric(text, "vllm:cascade_chunks") == 1 and metric(text, "vllm:cascade_chunk_pages_pinned") == 8
    assert metric(text, "vllm:cascade_chunk_registrations_total") == 1
    assert metric(text, "vllm:cascade_chunk_hits_total") >= 2  # the second POST and the composition
    registry = requests.get(f"{url}/v1/chunks", timeout=10).json()["stats"]
    assert metric(text, "vllm:cascade_chunk_lookups_total") == registry["lookups"] >= 3  # 2 POSTs, 1 composition
    assert metric(text, "vllm:cascade_chunk_hit_rate") == pytest.approx(registry["hits"] / registry["lookups"])
    # Reuse on /metrics: the counters GET /v1/chunks reports (nothing ran in between), and the KV bytes
    # they stand for (the tiny model's KV bytes per token, from its config: float32 K and V per layer).
    stats = requests.get(f"{url}/v1/chunks", timeout=10).json()["stats"]
    cfg = json.loads((tiny_model / "config.json").read_text())
    kv_bytes = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    assert stats["compositions"] >= 1 and stats["reused_tokens"] >= 120
    for name, key in (("compositions", "compositions"), ("composed_tokens", "chunk_tokens"),
                      ("reused_tokens", "reused_tokens")):
        assert metric(text, f"vllm:cascade_chunk_{name}_total") == stats[key], name
    assert metric(text, "vllm:cascade_chunk_reused_kv_bytes_total") == stats["reused_tokens"] * kv_bytes
    assert metric(text, "vllm:cascade_chunk_reuse_rate") == pytest.approx(stats["chunk_reuse_rate"])

    # A chain pins only its own pages; its parent cannot be deleted before it (409).
    child = post(url, "/v1/chunks", {"token_ids": tail * 4, "parent": chunk["id"]})  # 24 tokens: 2 pages of its own
    assert child["num_pages"] == child["pinned_pages"] == 2 and chunk_stats(url)["pages_pinned"] == 10
    r = requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10)
    assert r.status_code == 409 and child["id"] in r.json()["error"]["message"], r.text
    assert requests.delete(f"{url}/v1/chunks/{child['id']}", timeout=10).status_code == 200

    r = requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] is True
    text = requests.get(f"{url}/metrics", timeout=30).text
    assert metric(text, "vllm:cascade_chunk_pages_pinned") == 0 and metric(text, "vllm:cascade_chunk_deletions_total") == 2
    for response in (requests.get(f"{url}/v1/chunks/{chunk['id']}", timeout=10),
                     requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10),
                     requests.post(f"{url}/v1/completions", timeout=30,
                                   json={"model": model, "chunks": [chunk["id"]], "prompt": tail, **GREEDY})):
        assert response.status_code == 404 and "unknown or deleted chunk" in response.json()["error"]["message"]
    assert "/v1/chunks" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("not json", 400, "not JSON"),
        ({"text": "a", "token_ids": [1]}, 400, "exactly one of"),
        ({"text": "a", "colour": "red"}, 400, "unknown fields"),
        ({"token_ids": [1, -2]}, 400, "non-negative"),
        ({"token_ids": list(range(5, 1030))}, 413, "does not fit"),
    ],
)
def test_chunk_api_refuses_bad_bodies(server, body, status, message):
    url, _, _, _ = server
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    r = requests.post(f"{url}/v1/chunks", timeout=30, **kwargs)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert requests.get(f"{url}/v1/chunks", timeout=10).json()["data"] == []  # nothing registered


# A system prompt as a chunk: the chat template's system turn, written out; the chat messages
# that follow it are templated by vLLM as usual.
SYSTEM = ("You are a helpful assistant. The library opens at nine in the morning and closes at six in the "
          "evening on weekdays. Please remember to bring your passport, your ticket, and a warm jacket.")
SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
USER = [{"role": "user", "content": "Can you tell me a story about a brave mouse?"}]


def test_any_order_composition_over_http(server, tiny_model):
    """Two chunks registered independently, composed in the order opposite to registration: the
    prompt vLLM ran is each chunk on its own pages, every chunk token came from pinned pages, and
    the tokens are those of the Hugging Face reference that prefills each chunk alone."""
    import torch
    from test_e2e_llm import window
    from transformers import AutoModelForCausalLM

    from vllm_cascade.testing.composition_ref import independent_greedy

    url, _, _, _ = server
    first, second, tail = window(tiny_model, 2000, 40), window(tiny_model, 2500, 50), window(tiny_model, 3000, 5)
    a = post(url, "/v1/chunks", {"token_ids": first})
    b = post(url, "/v1/chunks", {"token_ids": second})
    before = chunk_stats(url)
    body = {"model": server_model(url), "chunks": [b["id"], a["id"]], "prompt": tail, **GREEDY}
    choice = post(url, "/v1/completions", body)["choices"][0]
    assert choice["prompt_token_ids"] == second + first + tail  # pads left out
    after = chunk_stats(url)
    assert after["reused_tokens"] - before["reused_tokens"] == after["chunk_tokens"] - before["chunk_tokens"] == 90
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        assert choice["token_ids"] == independent_greedy(model, [second, first], tail, GREEDY["max_tokens"])
    for chunk in (a, b):
        assert requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10).status_code == 200


def chunk_stats(url: str) -> dict:
    return requests.get(f"{url}/v1/chunks", timeout=10).json()["stats"]


def sse_events(response) -> list[dict]:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: "):]))
    return events


def test_chat_with_chunks_equals_the_text_written_out(server):
    """/v1/chat/completions with "chunks": the chunks' stored tokens, then the templated messages;
    greedy tokens equal the same conversation sent as plain messages, and the chunk is reused."""
    url, _, _, _ = server
    model = server_model(url)
    chunk = post(url, "/v1/chunks", {"text": SYSTEM_TURN, "kind": "system"})
    assert chunk["status"] == "ready" and chunk["num_tokens"] >= 32, chunk
    before = chunk_stats(url)

    composed = post(url, "/v1/chat/completions", {"model": model, "chunks": [chunk["id"]], "messages": USER, **GREEDY})
    plain = post(url, "/v1/chat/completions",
                 {"model": model, "messages": [{"role": "system", "content": SYSTEM}, *USER], **GREEDY})
    want = plain["prompt_token_ids"]  # vLLM sees the chunk's page padding; the client does not
    assert composed["prompt_token_ids"] == want  # the chunk was not tokenized again
    assert composed["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    assert composed["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert composed["usage"]["prompt_tokens"] == len(want)

    # Its full pages came from the chunk's pinned pages (vLLM's num_cached_tokens, counted by the API).
    after = chunk_stats(url)
    assert after["compositions"] == before["compositions"] + 1
    assert after["chunk_tokens"] - before["chunk_tokens"] == chunk["num_tokens"]
    assert after["reused_tokens"] - before["reused_tokens"] == chunk["num_tokens"]
    assert 0 < after["chunk_reuse_rate"] <= 1

    # Streaming: the same text, and the chunk is held until the stream ends.
    with requests.post(f"{url}/v1/chat/completions", timeout=120, stream=True,
                       json={"model": model, "chunks": [chunk["id"]], "messages": USER, "stream": True, **GREEDY}) as r:
        assert r.status_code == 200, r.text
        events = sse_events(r)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == composed["choices"][0]["message"]["content"]
    assert requests.get(f"{url}/v1/chunks/{chunk['id']}", timeout=10).json()["holders"] == 0
    assert requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10).status_code == 200


def test_composition_errors_over_completions_and_chat(server, tiny_model):
    """400 malformed, 404 unknown chunk, 413 longer than the context; the chunks are released."""
    from test_e2e_llm import window

    url, _, _, _ = server
    model = server_model(url)
    a = post(url, "/v1/chunks", {"token_ids": window(tiny_model, 0, 600)})
    b = post(url, "/v1/chunks", {"token_ids": window(tiny_model, 1000, 500)})
    routes = {"/v1/completions": {"model": model, "prompt": "Once upon a time", **GREEDY},
              "/v1/chat/completions": {"model": model, "messages": USER, **GREEDY}}
    for route, body in routes.items():
        cases = [
            ({**body, "chunks": a["id"]}, 400, "must be a list of chunk ids"),
            ({**body, "chunks": [a["id"], 7]}, 400, "must be a list of chunk ids"),
            ({**body, "chunks": ["f" * 64]}, 404, "unknown or deleted chunk"),
            ({**body, "chunks": [a["id"], b["id"]]}, 413, "does not fit the model's context"),
        ]
        if route == "/v1/completions":
            cases.append(({**body, "chunks": [a["id"]], "prompt": ["two", "prompts"]}, 400, "one text or one list"))
        else:
            cases.append(({"model": model, "chunks": [a["id"]]}, 400, "messages"))  # no messages
        for case, status, message in cases:
            r = requests.post(f"{url}{route}", json=case, timeout=60)
            assert r.status_code == status and message in r.json()["error"]["message"], (route, case.get("chunks"), r.text)
        r = requests.post(f"{url}{route}", data="{not json", timeout=60)
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"], r.text
    for chunk in (a, b):
        assert requests.get(f"{url}/v1/chunks/{chunk['id']}", timeout=10).json()["holders"] == 0
        assert requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10).status_code == 200


def test_conflicts_while_a_chunk_is_being_registered(server, tiny_model):
    """409: deleting a chunk whose registration (prefill, pinning) is under way. A second POST of
    the same content waits for the first and returns the same, pinned chunk."""
    from concurrent.futures import ThreadPoolExecutor

    from test_e2e_llm import window

    url, _, _, _ = server
    model = server_model(url)
    tokens = window(tiny_model, 300, 64)
    # Traffic ahead of the chunk: 8 running requests (--max-num-seqs 8) and 40 waiting, 900 tokens
    # each, so that the chunk's prefill waits in vLLM's queue (first come, first served) until the
    # busy requests' clients leave.
    busy = [requests.post(f"{url}/v1/completions", stream=True, timeout=120,
                          json={"model": model, "prompt": f"{PROMPT} {i}", "stream": True,
                                "temperature": 0.0, "max_tokens": 900, "ignore_eos": True}) for i in range(48)]
    try:
        assert all(r.status_code == 200 for r in busy)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, url, "/v1/chunks", {"token_ids": tokens})
            deadline = time.monotonic() + 60
            while not (listed := requests.get(f"{url}/v1/chunks", timeout=10).json()["data"]):
                assert time.monotonic() < deadline and not first.done(), "the registration did not start"
                time.sleep(0.05)
            (pending,) = listed
            assert pending["status"] == "registering" and pending["pinned_pages"] == 0, pending
            r = requests.delete(f"{url}/v1/chunks/{pending['id']}", timeout=10)
            assert r.status_code == 409 and "still being registered" in r.json()["error"]["message"], r.text
            second = pool.submit(post, url, "/v1/chunks", {"token_ids": tokens})
            time.sleep(0.5)
            assert not first.done() and not second.done()  # both wait for the prefill
            for r in busy:  # free the slots (vLLM aborts a request whose client left)
                r.close()
            chunks = [first.result(timeout=120), second.result(timeout=120)]
    finally:
        for r in busy:
            r.close()
    assert chunks[0] == chunks[1] and chunks[0]["status"] == "ready"
    assert chunks[0]["pinned_pages"] == chunks[0]["num_pages"] == 64 // 16
    assert requests.delete(f"{url}/v1/chunks/{pending['id']}", timeout=10).status_code == 200


def test_chunk_routes_are_in_the_openapi_schema(server):
    url, _, _, _ = server
    paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert {"get", "post"} <= set(paths["/v1/chunks"]) and {"get", "delete"} <= set(paths["/v1/chunks/{chunk_id}"])
    chunk_body = paths["/v1/chunks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "token_ids", "kind", "label", "parent"} == set(chunk_body["properties"])
    for route in ("/v1/completions", "/v1/chat/completions"):
        operation = paths[route]["post"]
        assert "chunks" in operation["tags"], operation
        assert "chunks" in operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert {"400", "404", "413"} <= set(operation["responses"]), operation["responses"]
    # The errors each chunk route answers with, with their body.
    for route, method, codes in (("/v1/chunks", "post", {"400", "404", "409", "413", "501"}),
                                 ("/v1/chunks/{chunk_id}", "get", {"404"}),
                                 ("/v1/chunks/{chunk_id}", "delete", {"404", "409"})):
        responses = paths[route][method]["responses"]
        assert codes <= set(responses), (route, method, responses)
        error = responses["404"]["content"]["application/json"]["schema"]
        assert error["properties"]["error"]["properties"].keys() == {"message", "type", "code"}


def test_failed_registration_removes_the_chunks_registered_on_it():
    """A parent chunk whose registration fails while children are being registered on it: its
    client gets the original error (not ChunkInUse), the children (whose prefill waits for the
    parent's pages) go with it and end with 409, and every page pinned is unpinned. Over a real
    server the engine's failure cannot be timed, so ChunkService runs on a fake engine client whose
    prefill of the parent fails when the test says."""
    import asyncio
    import collections
    from types import SimpleNamespace

    from vllm_cascade.chunks.registry import ChunkInUse
    from vllm_cascade.chunks.store import ChunkConflict, ChunkSpec
    from vllm_cascade.entrypoints.http import ChunkService

    page = 16
    parent_tokens, child_tokens, late_tokens = list(range(1, 33)), list(range(100, 132)), list(range(200, 232))

    class Engine:
        def __init__(self):
            model = SimpleNamespace(model="fake", dtype="float32", max_model_len=1024)
            self.vllm_config = SimpleNamespace(model_config=model, cache_config=SimpleNamespace(block_size=page),
                                               additional_config={})
            self.engine_core = self
            self.pins = collections.Counter()  # page -> references the chunk API holds
            self.gates = {}  # a prompt's last tokens -> (event, error to raise then or None)
            self.next_page = 0

        async def generate(self, prompt, params, request_id):
            tokens = prompt["prompt_token_ids"]
            for last, (event, error) in self.gates.items():
                if tuple(tokens[-len(last):]) == last:
                    await event.wait()
                    if error is not None:
                        raise error
            yield SimpleNamespace(num_cached_tokens=0)

        async def call_utility_async(self, method, *args):
            if method == "cascade_pin_chunk":
                pages = list(range(self.next_page, self.next_page + len(args[3])))
                self.next_page += len(pages)
                self.pins.update(pages)
                return pages
            assert method == "cascade_unpin_pages", method
            self.pins.subtract(args[0])

    async def scenario():
        engine = Engine()
        service = ChunkService(engine, total_pages=100)
        parent_go, late_go = asyncio.Event(), asyncio.Event()
        engine.gates = {tuple(parent_tokens): (parent_go, RuntimeError("the engine failed")),
                        tuple(late_tokens): (late_go, None)}
        parent = asyncio.create_task(service.register(ChunkSpec(token_ids=parent_tokens)))
        await asyncio.sleep(0)
        (pending,) = service.registry.list()
        children = [asyncio.create_task(service.register(ChunkSpec(token_ids=t, parent=pending.chunk_id)))
                    for t in (child_tokens, late_tokens)]
        await asyncio.sleep(0)
        assert len(service.registry.children(pending.chunk_id)) == 2  # registered, waiting for the parent's pages
        parent_go.set()
        with pytest.raises(RuntimeError, match="the engine failed"):  # not ChunkInUse from the clean-up
            await parent
        late_go.set()
        for child in children:
            with pytest.raises(ChunkConflict, match="parent chunk .* failed to register"):
                await child
        assert service.registry.list() == [] and service.registry.pages_pinned == 0
        await service.flush()
        assert not +engine.pins, f"pages left pinned: {+engine.pins}"
        # The clean-up itself: a chunk with children goes with them, and never raises.
        a = await service.register(ChunkSpec(token_ids=parent_tokens[:16]))
        await service.register(ChunkSpec(token_ids=child_tokens[:16], parent=a["id"]))
        with pytest.raises(ChunkInUse):
            service.registry.delete(a["id"])
        chunk = service.registry.get(a["id"])
        service._discard(chunk)
        service._discard(chunk)  # already gone: nothing
        await service.flush()
        assert service.registry.list() == [] and not +engine.pins

    asyncio.run(scenario())


def test_an_engine_that_cannot_hold_chunks_refuses_registrations_with_501():
    """The chunk API of a server whose engine cannot hold chunks (the engine core's
    cascade_chunk_problem, e.g. another attention backend): POST /v1/chunks answers 501 with that
    reason, and nothing is prefilled. A fake engine client, as above: a stock-backend server would
    cost CI another engine start for one line of routing."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_cascade.entrypoints.http import ChunkService, router

    class Engine:
        vllm_config = SimpleNamespace(model_config=SimpleNamespace(model="fake", dtype="float32", max_model_len=1024),
                                      cache_config=SimpleNamespace(block_size=16), additional_config={})

        async def generate(self, *args):
            raise AssertionError("nothing may be prefilled")
            yield

    reason = "chunks need the CASCADE attention backend (--attention-backend cascade): ..."
    app = FastAPI()
    app.include_router(router)
    app.state.cascade_chunks = ChunkService(Engine(), total_pages=100, problem=reason)
    response = TestClient(app).post("/v1/chunks", json={"token_ids": [1, 2, 3]})
    assert response.status_code == 501, response.text
    assert response.json()["error"] == {"message": reason, "type": "ChunksUnavailable", "code": 501}
    assert app.state.cascade_chunks.registry.list() == []


def test_chunks_persist_across_server_restarts(tiny_model, tmp_path):
    """With `chunk_persistence_dir`, a chain registered over HTTP is saved; a deleted chunk's files
    go; after the server stops, a new server with the same directory lists the chain, ready, and a
    composition on it is served from the reloaded pages (prefix-cache hit, nothing prefilled)."""
    from test_e2e_llm import window

    persist = tmp_path / "chunks"
    config = {"chunk_persistence_dir": str(persist)}
    parent_tokens, tail = window(tiny_model, 100, 120), window(tiny_model, 900, 6)

    def files() -> set[str]:
        return {p.name for p in persist.iterdir()}

    with running_server(tiny_model, tmp_path / "first", config) as (url, proc, _, log_path):
        parent = post(url, "/v1/chunks", {"token_ids": parent_tokens, "kind": "system", "label": "doc"})
        child = post(url, "/v1/chunks", {"token_ids": tail * 4, "parent": parent["id"]})  # 144 tokens: 9 pages
        gone = post(url, "/v1/chunks", {"token_ids": window(tiny_model, 500, 40)})
        chain = {f"{c['id']}{ext}" for c in (parent, child) for ext in (".json", ".rank0.kv")}
        assert files() == chain | {f"{gone['id']}.json", f"{gone['id']}.rank0.kv"}
        assert requests.delete(f"{url}/v1/chunks/{gone['id']}", timeout=10).status_code == 200
        assert files() == chain
        stats = chunk_stats(url)
        assert stats["saved_chunks"] == 3 and stats["prefilled_chunk_tokens"] == 120 + 24 + 40, stats  # own tokens: a chain reuses its parents' pages
        body = {"model": server_model(url), "chunks": [parent["id"], child["id"]], "prompt": tail, **GREEDY}
        before = post(url, "/v1/completions", body)["choices"][0]
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {STOP_TIMEOUT_S} s after SIGINT:\n{tail(log_path)}")
    assert files() == chain  # stopping keeps them

    with running_server(tiny_model, tmp_path / "second", config) as (url, _, _, _):
        listed = requests.get(f"{url}/v1/chunks", timeout=10).json()
        by_id = {c["id"]: c for c in listed["data"]}
        assert set(by_id) == {parent["id"], child["id"]}
        for chunk in (parent, child):
            assert by_id[chunk["id"]] == {**chunk, "created": by_id[chunk["id"]]["created"]}  # ready, pinned
        stats = listed["stats"]
        assert stats["reloaded_chunks"] == 2 and stats["reloaded_chunk_tokens"] == 120 + 24, stats
        assert stats["prefilled_chunk_tokens"] == 0 and stats["rejected_chunk_files"] == 0 and stats["pages_pinned"] == 10
        after = post(url, "/v1/completions", {**body, "model": server_model(url)})["choices"][0]
        stats = chunk_stats(url)
        assert stats["compositions"] == 1 and stats["reused_tokens"] == 144, stats  # every chunk token: a hit
        assert stats["prefilled_chunk_tokens"] == 0
        assert after["prompt_token_ids"] == parent_tokens + tail * 4 + tail  # pads left out
        assert after["token_ids"] == before["token_ids"]
        assert requests.delete(f"{url}/v1/chunks/{child['id']}", timeout=10).status_code == 200
        assert files() == {n for n in chain if n.startswith(parent["id"])}


def test_eviction_full_registry_and_deleting_a_chunk_in_use(tiny_model, tmp_path):
    """A real server with room for two chunks, LRU eviction on. A third chunk evicts the least
    recently used idle one (404 after, its pages unpinned, counted on /metrics). While a stream
    holds both chunks: a further chunk is refused with 413 and nothing changes; deleting a chunk the
    stream uses answers 200 and hides it, the stream goes on to the same text as an undisturbed run,
    and the chunk's pages are unpinned once the stream ends."""
    from test_e2e_llm import window

    with running_server(tiny_model, tmp_path, {"max_chunks": 2, "chunk_evict_lru": True}) as (url, _, _, _):
        model = server_model(url)
        old, b, c = (post(url, "/v1/chunks", {"token_ids": window(tiny_model, start, 32)}) for start in (100, 200, 300))
        assert requests.get(f"{url}/v1/chunks/{old['id']}", timeout=10).status_code == 404
        stats = chunk_stats(url)
        assert (stats["chunks"], stats["evictions"], stats["pages_pinned"]) == (2, 1, 4), stats
        text = requests.get(f"{url}/metrics", timeout=30).text
        assert metric(text, "vllm:cascade_chunk_evictions_total") == 1

        body = {"model": model, "chunks": [b["id"], c["id"]], "prompt": window(tiny_model, 900, 6),
                "temperature": 0.0, "max_tokens": 600, "ignore_eos": True}
        undisturbed = post(url, "/v1/completions", body)["choices"][0]["text"]
        stream = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120)
        try:
            assert stream.status_code == 200, stream.text
            events = (json.loads(line[len("data: "):])["choices"][0]["text"]
                      for line in stream.iter_lines(decode_unicode=True)
                      if line.startswith("data: ") and line != "data: [DONE]")
            texts = [next(events)]  # the first token: the request runs and holds its chunks
            assert requests.get(f"{url}/v1/chunks/{b['id']}", timeout=10).json()["holders"] == 1
            refused = requests.post(f"{url}/v1/chunks", json={"token_ids": window(tiny_model, 400, 32)}, timeout=60)
            assert refused.status_code == 413 and "registry full" in refused.json()["error"]["message"], refused.text
            assert [x["id"] for x in requests.get(f"{url}/v1/chunks", timeout=10).json()["data"]] == [b["id"], c["id"]]
            deleted = requests.delete(f"{url}/v1/chunks/{b['id']}", timeout=10)
            assert deleted.status_code == 200, deleted.text
            assert requests.get(f"{url}/v1/chunks/{b['id']}", timeout=10).status_code == 404
            assert chunk_stats(url)["pages_pinned"] == 4  # still held by the stream
            after_delete = list(events)
        finally:
            stream.close()
        assert after_delete, "the stream had ended before the chunk was deleted"
        assert "".join(texts + after_delete) == undisturbed
        stats = chunk_stats(url)
        assert (stats["chunks"], stats["deletions"], stats["pages_pinned"]) == (1, 1, 2), stats


def test_sigint_stops_server_and_cascade_ran_in_worker(server):
    url, proc, stats_dir, log_path = server
    from vllm_cascade.stats import read_stats_dir

    post(url, "/v1/completions", {"model": server_model(url), "prompt": PROMPT, **GREEDY})
    stats = read_stats_dir(str(stats_dir))
    assert_plugin_ran(stats, main_pid=proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {STOP_TIMEOUT_S} s after SIGINT:\n{tail(log_path)}")
    # Its engine processes are gone too (no process left in its group).
    deadline = time.monotonic() + 15
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _group_alive(proc.pid), f"processes of the server's group outlived it:\n{tail(log_path)}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_MODEL_IDS: dict[str, str] = {}


def server_model(url: str) -> str:
    if url not in _MODEL_IDS:
        r = requests.get(f"{url}/v1/models", timeout=10)
        assert r.status_code == 200, r.text
        _MODEL_IDS[url] = r.json()["data"][0]["id"]
    return _MODEL_IDS[url]


def test_registry_limits_come_from_the_settings():
    """`vllm serve` users set the chunk registry's limits as settings: `chunk_page_ratio` of the KV
    pages, `max_chunks`, and `chunk_evict_lru` (false: a full registry refuses with 413 and keeps
    what it has; true: the least recently used chunk makes room). A fake engine client stands in
    for vLLM, as above: the settings reach the registry the server builds."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_cascade.entrypoints.http import ChunkService, router

    class Engine:
        def __init__(self, settings):
            model = SimpleNamespace(model="fake", dtype="float32", max_model_len=1024)
            self.vllm_config = SimpleNamespace(model_config=model, cache_config=SimpleNamespace(block_size=16),
                                               additional_config={"cascade": settings})
            self.engine_core, self.next_page, self.unpinned = self, 0, []

        async def generate(self, prompt, params, request_id):
            yield SimpleNamespace(num_cached_tokens=0)

        async def call_utility_async(self, method, *args):
            if method == "cascade_pin_chunk":
                self.next_page += len(args[3])
                return list(range(self.next_page - len(args[3]), self.next_page))
            assert method == "cascade_unpin_pages", method
            self.unpinned += args[0]

    def client(settings):
        app = FastAPI()
        app.include_router(router)
        app.state.cascade_chunks = ChunkService(Engine(settings), total_pages=100)
        return app.state.cascade_chunks, TestClient(app)

    service, http = client({"chunk_page_ratio": 0.25, "max_chunks": 1, "chunk_evict_lru": False})
    assert (service.registry.page_budget, service.registry.max_chunks, service.registry.evict_lru) == (25, 1, False)
    first = http.post("/v1/chunks", json={"token_ids": list(range(1, 17))})
    assert first.status_code == 200, first.text
    refused = http.post("/v1/chunks", json={"token_ids": list(range(100, 116))})
    assert refused.status_code == 413 and "registry full" in refused.json()["error"]["message"], refused.text
    assert [c["id"] for c in http.get("/v1/chunks").json()["data"]] == [first.json()["id"]]

    service, http = client({"max_chunks": 1})  # evicts by default
    assert service.registry.page_budget == 50  # chunk_page_ratio 0.5
    first = http.post("/v1/chunks", json={"token_ids": list(range(1, 17))}).json()["id"]
    second = http.post("/v1/chunks", json={"token_ids": list(range(100, 116))})
    assert second.status_code == 200, second.text
    assert [c["id"] for c in http.get("/v1/chunks").json()["data"]] == [second.json()["id"]]
    assert http.get(f"/v1/chunks/{first}").status_code == 404
