"""End to end with `vllm-cascade serve ... --attention-backend cascade` (vLLM's own CLI).

Starts the OpenAI-compatible server on 127.0.0.1 (vLLM's default compilation
mode, unlike the eager `LLM` tests), sends a completion and a chat
completion, compares the greedy tokens with vLLM's CPU_ATTN backend run
offline, stops the server with SIGINT and checks, from the counters written
inside the worker, that CASCADE served the requests.
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
    work = tmp_path_factory.mktemp("server")
    stats_dir = work / "stats"
    stats_dir.mkdir()
    log_path = work / "server.log"
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm_cascade.entrypoints.cli", "serve", str(tiny_model),
        "--attention-backend", "cascade",
        "--host", HOST, "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024",
        "--block-size", "16", "--max-num-seqs", "8",  # default compilation: not eager
        "--additional-config", json.dumps({"cascade": {"min_saved_pages": 1, "min_saved_fraction": 0.0}}),
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
    assert metric(text, "vllm:cascade_layer_calls_total", 'path="torch"') > 0
    assert metric(text, "vllm:cascade_build_seconds_total") > 0
    kinds = files["steps_by_kind"]
    assert kinds.get("decode", 0) > 0 and kinds.get("prefill", 0) > 0 and sum(kinds.values()) == files["steps"]
    assert sum(files["build_ns_by_kind"].values()) == files["build_ns"]
    read, flat = metric(text, "vllm:cascade_kv_bytes_read_total"), metric(text, "vllm:cascade_kv_bytes_flat_total")
    assert 0 < read < flat and metric(text, "vllm:cascade_kv_bytes_saved_total") == flat - read
    assert "vllm:num_requests_running" in text  # the same endpoint as vLLM's own metrics


def test_chunk_api_registers_composes_and_deletes(server, tiny_model):
    """POST/GET/DELETE /v1/chunks and /v1/completions with "chunks", over a real server."""
    from test_e2e_llm import window

    url, _, _, _ = server
    chunk_ids, tail = window(tiny_model, 100, 120), window(tiny_model, 900, 6)
    chunk = post(url, "/v1/chunks", {"token_ids": chunk_ids, "kind": "system", "label": "doc-1"})
    assert chunk["num_tokens"] == 120 and chunk["pinned_pages"] == chunk["num_pages"] == 120 // 16
    assert post(url, "/v1/chunks", {"token_ids": chunk_ids})["id"] == chunk["id"]  # same content, same chunk
    listed = requests.get(f"{url}/v1/chunks", timeout=10).json()
    assert [c["id"] for c in listed["data"]] == [chunk["id"]] and listed["stats"]["pages_pinned"] == 7

    model = server_model(url)
    composed = post(url, "/v1/completions", {"model": model, "chunks": [chunk["id"]], "prompt": tail, **GREEDY})
    plain = post(url, "/v1/completions", {"model": model, "prompt": chunk_ids + tail, **GREEDY})
    assert composed["choices"][0]["prompt_token_ids"] == chunk_ids + tail
    assert composed["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    assert requests.get(f"{url}/v1/chunks/{chunk['id']}", timeout=10).json()["holders"] == 0

    text = requests.get(f"{url}/metrics", timeout=30).text
    assert metric(text, "vllm:cascade_chunks") == 1 and metric(text, "vllm:cascade_chunk_pages_pinned") == 7
    assert metric(text, "vllm:cascade_chunk_registrations_total") == 1
    assert metric(text, "vllm:cascade_chunk_hits_total") >= 2  # the second POST and the composition

    r = requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] is True
    text = requests.get(f"{url}/metrics", timeout=30).text
    assert metric(text, "vllm:cascade_chunk_pages_pinned") == 0 and metric(text, "vllm:cascade_chunk_deletions_total") == 1
    for response in (requests.get(f"{url}/v1/chunks/{chunk['id']}", timeout=10),
                     requests.delete(f"{url}/v1/chunks/{chunk['id']}", timeout=10),
                     requests.post(f"{url}/v1/completions", timeout=30,
                                   json={"model": model, "chunks": [chunk["id"]], "prompt": tail, **GREEDY})):
        assert response.status_code == 404 and "unknown or deleted chunk" in response.json()["error"]["message"]
    assert "/v1/chunks" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "not JSON"),
        ({"text": "a", "token_ids": [1]}, "exactly one of"),
        ({"text": "a", "colour": "red"}, "unknown fields"),
        ({"token_ids": [1, -2]}, "non-negative"),
        ({"token_ids": list(range(5, 1030))}, "does not fit"),
    ],
)
def test_chunk_api_refuses_bad_bodies(server, body, message):
    url, _, _, _ = server
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    r = requests.post(f"{url}/v1/chunks", timeout=30, **kwargs)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert requests.get(f"{url}/v1/chunks", timeout=10).json()["data"] == []  # nothing registered


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
