"""Two tensor-parallel ranks on the CPU: two worker processes, each with half the heads.

The scheduler -> worker path of chunks (pinning, page annotations, saving and
loading KV) reaches every rank through vLLM's collective RPC; here it runs
with two ranks, end to end: chunks composed on two ranks give the tokens of
one rank's plain prefill, each rank writes and reloads its own file, and the
fused Qwen3 class shards its folded weights as stock Qwen3 does.

vLLM's CPU workers bind their OpenMP threads per rank; on a machine with one
NUMA node the binding is given by hand (VLLM_CPU_OMP_THREADS_BIND, one core
per rank).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CASCADE_ENGINE, assert_plugin_ran, make_engine
from test_chunk_store import greedy
from test_e2e_llm import window

from vllm_cascade.chunks.store import ChunkStore

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
pytestmark = [pytest.mark.skipif(len(CORES) < 2, reason="two ranks need two cores"),
              pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on a GPU machine need two GPUs")]
TP2 = {**CASCADE_ENGINE, "tensor_parallel_size": 2}


@pytest.fixture(autouse=True)
def one_core_per_rank(monkeypatch):
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{CORES[0]}|{CORES[1]}")


def ranks_that_ran(engine) -> list[dict]:
    """Worker processes whose CASCADE backend computed attention on chunk steps."""
    return [s for s in engine.stats() if s["layer_calls"] > 0 and s["chunk_steps"] > 0]


def test_chunks_on_two_ranks_save_reload_and_free(tiny_model, tmp_path, reference_engine):
    """A chain and a chunk registered on two ranks: compositions equal one rank's plain prefill of
    the same text, both ranks ran the chunk steps, each rank saved its own file; after a restart both
    ranks load their pages without prefill and give the same tokens; deleting frees every page."""
    kv_dir = tmp_path / "chunks"
    config = {"cascade": {**CASCADE_ENGINE["additional_config"]["cascade"], "chunk_persistence_dir": str(kv_dir)}}
    system, doc, tail = window(tiny_model, 300, 100), window(tiny_model, 700, 150), window(tiny_model, 1100, 9)
    want = reference_engine.generate_ids([system + doc + tail, system + tail], max_tokens=16)

    first = make_engine(tiny_model, tmp_path / "stats-1", name="tp2-first", **{**TP2, "additional_config": config})
    try:
        store = ChunkStore(first.llm)
        free_before = store.kv_pages()["free"]
        a = store.register_chunk(token_ids=system, kind="system")
        b = store.register_chunk(token_ids=doc, parent=a.chunk_id)
        assert store.kv_pages()["free"] == free_before - store.stats()["pages_pinned"]
        compositions = [{"chunks": [a.chunk_id, b.chunk_id], "tail": tail}, {"chunks": [a.chunk_id], "tail": tail}]
        outs = store.generate(compositions, greedy())
        assert [list(o.outputs[0].token_ids) for o in outs] == want
        assert [o.num_cached_tokens for o in outs] == [100 + 150, 100]  # every chunk token from the pins
        assert_plugin_ran(first.stats())
        assert len({s["pid"] for s in ranks_that_ran(first)}) == 2, first.stats()
        ids = (a.chunk_id, b.chunk_id)
    finally:
        first.shutdown()
    assert sorted(p.name for p in kv_dir.iterdir()) == sorted(
        [f"{i}.json" for i in ids] + [f"{i}.rank{r}.kv" for i in ids for r in (0, 1)])

    second = make_engine(tiny_model, tmp_path / "stats-2", name="tp2-second", **{**TP2, "additional_config": config})
    try:
        store = ChunkStore(second.llm)
        stats = store.stats()
        assert (stats["reloaded_chunks"], stats["prefilled_chunk_tokens"], stats["rejected_chunk_files"]) == (2, 0, 0)
        outs = store.generate(compositions, greedy())
        assert [list(o.outputs[0].token_ids) for o in outs] == want
        assert [o.num_cached_tokens for o in outs] == [100 + 150, 100]
        assert len({s["pid"] for s in ranks_that_ran(second)}) == 2, second.stats()
        pinned = stats["pages_pinned"]
        free_loaded = store.kv_pages()["free"]
        store.delete_chunk(b.chunk_id)
        store.delete_chunk(a.chunk_id)
        assert store.kv_pages()["free"] == free_loaded + pinned  # both chunks' pages back in the pool
    finally:
        second.shutdown()
    assert not list(kv_dir.iterdir())  # deleting removed both ranks' files


def test_fused_class_on_two_ranks_equals_stock(tiny_model, tmp_path, reference_engine):
    """The fused Qwen3 class with its weights sharded over two ranks (each rank folds the norms into
    its own columns of the QKV and gate/up projections): greedy tokens of one rank's stock Qwen3."""
    from test_fused_qwen3 import PROMPTS, functions_to_workers, generate

    from vllm_cascade.models.qwen3 import ARCHITECTURE, fused_paths_of

    with functions_to_workers():
        engine = make_engine(tiny_model, tmp_path / "stats", name="tp2-fused",
                             hf_overrides={"architectures": [ARCHITECTURE]}, **TP2)
    try:
        got = generate(engine, PROMPTS, max_tokens=16)
        with functions_to_workers():
            per_rank = engine.llm.apply_model(fused_paths_of)
    finally:
        engine.shutdown()
    want = generate(reference_engine, PROMPTS, max_tokens=16)
    assert [g.ids for g in got] == [g.ids for g in want]
    assert len(per_rank) == 2, per_rank
    for paths in per_rank:
        assert paths["class"] == ARCHITECTURE and paths["norms_folded"] == paths["layers"] > 0, per_rank
