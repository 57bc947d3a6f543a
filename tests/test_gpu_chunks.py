"""Chunk compositions on the GPU, end to end (GPU only).

The exact cases of a composition (one chunk, or a chain registered in its
parents' context, then a tail) must give what vLLM gives for the same text
prefilled in full. In bf16 "the same" means as accurate as stock bf16:
CASCADE (FlashInfer chunk prefill, Triton decode kernels in FULL CUDA graphs)
is held to the fp32 reference by the bf16 rule of vllm_cascade.testing.greedy,
as the fused model class is in test_fused_qwen3.py, on the same perturbed tiny
checkpoint (its logits are sharp, unlike vLLM's dummy weights).
"""

from __future__ import annotations

import pytest
import torch
from conftest import AGGRESSIVE_CASCADE, assert_plugin_ran, make_engine
from test_e2e_llm import window
from test_fused_qwen3 import (
    GPU_ENGINE,
    assert_close_in_bf16,
    generate,
    perturbed_checkpoint,
)

from vllm_cascade.testing.greedy import from_outputs, sampling_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_exact_compositions_close_to_stock(tiny_model, session_tmp):
    from vllm_cascade.chunks.store import ChunkStore

    path = perturbed_checkpoint(tiny_model, session_tmp / "tiny-qwen3-perturbed-chunks", untie=False)
    system, doc, alone, tail = (window(tiny_model, s, n) for s, n in ((300, 100), (700, 150), (50, 60), (1100, 9)))
    texts = [system + tail, system + doc + tail, alone + tail]

    stock = {}
    for dtype in ("bfloat16", "float32"):
        engine = make_engine(path, session_tmp / f"stats-gpu-chunks-stock-{dtype}", name=f"stock-{dtype}",
                             dtype=dtype, **GPU_ENGINE)
        try:
            stock[dtype] = generate(engine, texts, max_tokens=32)
        finally:
            engine.shutdown()

    engine = make_engine(path, session_tmp / "stats-gpu-chunks-cascade", name="cascade-chunks", dtype="bfloat16",
                         **{**GPU_ENGINE, "attention_backend": "cascade", "block_size": 16,
                            "additional_config": AGGRESSIVE_CASCADE})
    try:
        store = ChunkStore(engine.llm)
        a = store.register_chunk(token_ids=system, kind="system")
        b = store.register_chunk(token_ids=doc, parent=a.chunk_id)
        c = store.register_chunk(token_ids=alone)
        outs = store.generate([{"chunks": [a.chunk_id], "tail": tail}, {"chunks": [a.chunk_id, b.chunk_id], "tail": tail},
                               {"chunks": [c.chunk_id], "tail": tail}], sampling_params(32))
        totals = engine.totals()
        assert_plugin_ran(engine.stats())
    finally:
        engine.shutdown()
    composed = from_outputs(outs)
    assert [o.num_cached_tokens for o in outs] == [100, 250, 60]  # every chunk token from the pins
    assert [list(o.prompt_token_ids) for o in outs] == texts
    assert totals["chunk_steps"] > 0, totals  # pads masked by the plugin's kernels

    assert_close_in_bf16(composed, stock["bfloat16"], stock["float32"], "composed")
