"""End to end with `LLM(...)`: CASCADE's greedy tokens equal vLLM's CPU_ATTN's.

The tiny model runs in fp32 with greedy decoding, chunked prefill over a
64-token budget (long prompts take several steps, and prefill chunks share
steps with decodes) and 16-token pages for CASCADE (partial pages everywhere).
Every test also checks, from the counters the backend writes inside the
worker, that CASCADE really served the requests.
"""

from __future__ import annotations

import functools

import pytest
from conftest import SCHEDULING, assert_plugin_ran, make_engine

LENGTHS = [1, 7, 40, 150, 400]
NEW_TOKENS = 24


@functools.lru_cache(maxsize=1)
def corpus_ids(model_path: str) -> tuple[int, ...]:
    """The tiny tokenizer's own corpus as token ids: natural text for prompts."""
    from tokenizers import Tokenizer

    from vllm_cascade.testing.tiny_model import CORPUS

    tok = Tokenizer.from_file(f"{model_path}/tokenizer.json")
    ids = tuple(tok.encode(CORPUS).ids)
    assert len(ids) > 1500, len(ids)
    return ids


def window(model_path, start: int, length: int) -> list[int]:
    ids = corpus_ids(str(model_path))
    start %= len(ids) - length
    return list(ids[start : start + length])


def assert_same_tokens(prompts, got, want, what: str) -> None:
    """Equal token ids; else name the first prompt and position that differ."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            pos = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            pytest.fail(
                f"{what}: prompt {i} ({len(prompts[i])} tokens, starts {prompts[i][:8]}) differs at new token "
                f"{pos}: cascade {g[pos:pos + 4]} vs CPU_ATTN {w[pos:pos + 4]}\ncascade  {g}\nCPU_ATTN {w}"
            )


@pytest.mark.parametrize("length", LENGTHS)
def test_batch_of_one_matches_cpu_attn(cascade_engine, reference_engine, tiny_model, length):
    prompt = [window(tiny_model, 37 * length, length)]
    before = cascade_engine.totals()
    got = cascade_engine.generate_ids(prompt, NEW_TOKENS)
    want = reference_engine.generate_ids(prompt, NEW_TOKENS)
    assert len(got[0]) == NEW_TOKENS
    assert_same_tokens(prompt, got, want, f"batch of 1, {length}-token prompt")
    after = cascade_engine.totals()
    # Chunked prefill: a prompt of n tokens takes ceil(n / 64) steps before its first decode.
    assert after["steps"] - before["steps"] >= -(-length // 64) + NEW_TOKENS - 1
    assert after["layer_calls"] > before["layer_calls"]
    assert_plugin_ran(cascade_engine.stats())
    assert reference_engine.stats() == []  # the reference really is vLLM's own backend


def test_batch_of_eight_matches_cpu_attn(cascade_engine, reference_engine, tiny_model):
    lengths = LENGTHS + [17, 64, 300]
    prompts = [window(tiny_model, 101 * i + 11, n) for i, n in enumerate(lengths)]
    got = cascade_engine.generate_ids(prompts, NEW_TOKENS)
    want = reference_engine.generate_ids(prompts, NEW_TOKENS)
    assert all(len(g) == NEW_TOKENS for g in got)
    assert_same_tokens(prompts, got, want, "batch of 8")
    assert_plugin_ran(cascade_engine.stats())


def test_shared_prefix_cascades_and_matches_cpu_attn(cascade_engine, reference_engine, tiny_model):
    prefix = window(tiny_model, 0, 200)  # 12 full 16-token pages + 8 tokens
    tails = [window(tiny_model, 400 + 53 * i, 3 + 5 * i) for i in range(8)]
    prompts = [prefix + tail for tail in tails]
    before = cascade_engine.totals()
    got = cascade_engine.generate_ids(prompts, NEW_TOKENS)
    after = cascade_engine.totals()
    want = reference_engine.generate_ids(prompts, NEW_TOKENS)
    assert_same_tokens(prompts, got, want, "shared 200-token prefix")
    assert len({tuple(g) for g in got}) > 1, "distinct tails should give distinct continuations"
    assert_plugin_ran(cascade_engine.stats())
    cascade_steps = after["cascade_steps"] - before["cascade_steps"]
    saved = (after["flat_pages_read"] - before["flat_pages_read"]) - (after["pages_read"] - before["pages_read"])
    assert cascade_steps > 0, f"no step cascaded over the shared prefix: {before} -> {after}"
    assert saved > 0, f"cascade read no fewer pages than flat attention: {before} -> {after}"


def test_system_prompt_and_group_documents_cascade_three_levels(cascade_engine, reference_engine, tiny_model):
    """A system prompt for all (level 0), a document per group of four (level 1), own tails."""
    from vllm_cascade.stats import summarize

    system = window(tiny_model, 0, 64)  # 4 full pages
    documents = [window(tiny_model, 100 + 150 * d, 96) for d in range(2)]  # 6 full pages each
    prompts = [system + documents[i // 4] + window(tiny_model, 500 + 37 * i, 5 + i) for i in range(8)]
    before = summarize(cascade_engine.stats())["levels"].get("3", 0)
    got = cascade_engine.generate_ids(prompts, NEW_TOKENS)
    after = summarize(cascade_engine.stats())["levels"].get("3", 0)
    assert_same_tokens(prompts, got, reference_engine.generate_ids(prompts, NEW_TOKENS), "system + group documents")
    assert after > before, f"no step ran three levels ({before} -> {after})"


@pytest.mark.parametrize("name", ["cascade", "CASCADE", "Cascade"])
def test_backend_name_is_case_insensitive(name):
    from vllm.config import AttentionConfig

    assert AttentionConfig(backend=name).backend.name == "CASCADE"


def test_attention_config_dict_selects_cascade(tiny_model, reference_engine, tmp_path):
    """`attention_config={"backend": ...}` (here upper case) instead of `attention_backend=`."""
    engine = make_engine(
        tiny_model,
        tmp_path / "stats",
        name="dict-form",
        attention_config={"backend": "CASCADE"},
        block_size=16,
        **{**SCHEDULING, "max_num_seqs": 4},
    )
    try:
        prompts = [window(tiny_model, 700, 90)]
        got = engine.generate_ids(prompts, 8)
        assert_plugin_ran(engine.stats())
    finally:
        engine.shutdown()
    assert_same_tokens(prompts, got, reference_engine.generate_ids(prompts, 8), "attention_config dict form")
