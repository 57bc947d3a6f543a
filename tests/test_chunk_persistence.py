"""Chunk persistence: KV pages saved to files, reloaded by a new engine without prefill.

The file checks (fingerprint, checksum, another model's files) run on hand-made files; the
round trip runs two CASCADE engines one after the other (CPU), the second reading what the first
wrote, and compares greedy tokens with vLLM's CPU_ATTN engine on the same text.
"""

from __future__ import annotations

import json
import logging

import pytest
from conftest import AGGRESSIVE_CASCADE, CASCADE_ENGINE, assert_plugin_ran, make_engine
from test_chunk_store import greedy
from test_e2e_llm import window

from vllm_cascade import vllm_compat
from vllm_cascade.chunks.persist import ChunkFiles
from vllm_cascade.chunks.registry import ChunkRegistry
from vllm_cascade.chunks.store import ChunkStore

LAYOUT = [{"rank": 0, "layers": [[[2, 16, 128], "torch.float32"]] * 4, "kv_cache_layout": "LBHNC"}]
FINGERPRINT = {"format": 1, "registry": "model-a|float32|16", "plugin_version": "0.1.0", "kv_layout": LAYOUT}


def saved_chunk(tmp_path, fingerprint=FINGERPRINT):
    """A chunk's files as the store writes them (the rank file's bytes stand for torch.save's)."""
    files = ChunkFiles(tmp_path, fingerprint)
    reg = ChunkRegistry(fingerprint["registry"], page_size=4, page_budget=10)
    chunk, _ = reg.register(list(range(9)), kind="system")
    (tmp_path / f"{chunk.chunk_id}.rank0.kv").write_bytes(b"pages" * 100)
    import hashlib

    sha = hashlib.sha256(b"pages" * 100).hexdigest()
    files.write_manifest(chunk, [{"rank": 0, "file": f"{chunk.chunk_id}.rank0.kv", "sha256": sha, "bytes": 500,
                                  "pages": 2}])
    return chunk


def test_files_are_checked_against_fingerprint_and_checksum(tmp_path, caplog):
    chunk = saved_chunk(tmp_path)
    [ok] = ChunkFiles(tmp_path, FINGERPRINT).scan()
    assert ok.problem is None and ok.chunk_id == chunk.chunk_id and ok.token_ids == list(range(9))
    assert (ok.num_pages, ok.kind) == (2, "system")
    # Another plugin version or page layout: rejected, saying what differs.
    newer = {**FINGERPRINT, "plugin_version": "0.2.0"}
    [rejected] = ChunkFiles(tmp_path, newer).scan()
    assert "plugin_version (saved '0.1.0', now '0.2.0')" in rejected.problem
    # Another model's files are not this model's chunks: left alone.
    with caplog.at_level(logging.INFO, logger="vllm_cascade.chunks.persist"):
        assert list(ChunkFiles(tmp_path, {**FINGERPRINT, "registry": "model-b|float32|16"}).scan()) == []
    assert "another model's" in caplog.text
    # One byte changed in the pages: the checksum says so.
    rank_file = tmp_path / f"{chunk.chunk_id}.rank0.kv"
    data = bytearray(rank_file.read_bytes())
    data[10] ^= 1
    rank_file.write_bytes(bytes(data))
    [corrupt] = ChunkFiles(tmp_path, FINGERPRINT).scan()
    assert "SHA-256" in corrupt.problem and "corrupt" in corrupt.problem
    # A manifest whose tokens do not give its id is not trusted at all (logged, left).
    manifest = tmp_path / f"{chunk.chunk_id}.json"
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "token_ids": [1, 2, 3]}))
    assert list(ChunkFiles(tmp_path, FINGERPRINT).scan()) == [] and "cannot be read" in caplog.text
    ChunkFiles(tmp_path, FINGERPRINT).remove(chunk.chunk_id)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,saved,now", [
    ("kv_cache_dtype", "auto", "fp8"),
    ("tensor_parallel_size", 1, 2),
    ("attention_backend", "CASCADE", "FLASHINFER"),
    ("kv_layout", LAYOUT, [{**LAYOUT[0], "kv_cache_layout": "LBNHC"}]),
    ("vllm_version", "0.32.0", "0.33.0"),
])
def test_files_saved_under_other_settings_are_rejected_naming_them(tmp_path, field, saved, now):
    """Whatever the saved pages' bytes depend on, besides the model and its dtype and page size (which
    name the chunk ids): a file saved under another value is rejected, and the reason names it."""
    saved_chunk(tmp_path, {**FINGERPRINT, field: saved})
    [rejected] = ChunkFiles(tmp_path, {**FINGERPRINT, field: now}).scan()
    assert rejected.problem is not None and field in rejected.problem, rejected.problem
    [same] = ChunkFiles(tmp_path, {**FINGERPRINT, field: saved}).scan()
    assert same.problem is None


def test_chunks_reload_after_restart_without_prefill(tiny_model, tmp_path, reference_engine, caplog):
    kv_dir = tmp_path / "chunks"
    settings = {**CASCADE_ENGINE,
                "additional_config": {"cascade": {**AGGRESSIVE_CASCADE["cascade"], "chunk_persistence_dir": str(kv_dir)}}}
    system, doc, other = window(tiny_model, 300, 100), window(tiny_model, 700, 150), window(tiny_model, 40, 70)
    tail = window(tiny_model, 1100, 9)

    first = make_engine(tiny_model, tmp_path / "stats-1", name="first", **settings)
    try:
        store = ChunkStore(first.llm)  # the setting turns persistence on
        a = store.register_chunk(token_ids=system, kind="system")
        b = store.register_chunk(token_ids=doc, parent=a.chunk_id)
        c = store.register_chunk(token_ids=other, label="to be corrupted")
        gone = store.register_chunk(token_ids=window(tiny_model, 900, 40))
        store.delete_chunk(gone.chunk_id)  # its files go with it
        assert store.stats()["saved_chunks"] == 4
        ids = (a.chunk_id, b.chunk_id, c.chunk_id)
    finally:
        first.shutdown()
    assert sorted(p.name for p in kv_dir.iterdir()) == sorted(
        [f"{i}.json" for i in ids] + [f"{i}.rank0.kv" for i in ids])
    rank_file = kv_dir / f"{c.chunk_id}.rank0.kv"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of c's pages
    rank_file.write_bytes(bytes(data))

    second = make_engine(tiny_model, tmp_path / "stats-2", name="second", **settings)
    try:
        free_before = vllm_compat.call_engine_core(second.llm, "cascade_kv_pages")["free"]
        with caplog.at_level(logging.WARNING, logger="vllm_cascade.chunks.store"):
            store = ChunkStore(second.llm)
        assert {x.chunk_id for x in store.list_chunks()} == set(ids)
        stats = store.stats()
        # a and b came from their files; c was rejected, logged, and computed again (its tokens only).
        assert (stats["reloaded_chunks"], stats["rejected_chunk_files"]) == (2, 1)
        assert stats["reloaded_chunk_tokens"] == 100 + 150 and stats["prefilled_chunk_tokens"] == 70
        assert f"chunk {c.chunk_id}: saved KV rejected" in caplog.text and "SHA-256" in caplog.text
        assert stats["pages_pinned"] == 7 + 10 + 5  # each chunk's own pages, the last one padded
        assert store.kv_pages()["free"] == free_before - stats["pages_pinned"]  # pinned, as the engine counts

        outs = store.generate([{"chunks": [a.chunk_id, b.chunk_id], "tail": tail},
                               {"chunks": [c.chunk_id], "tail": tail}], greedy())
        # The first request on this engine found the whole chain in the prefix cache: the loaded pages.
        assert outs[0].num_cached_tokens == 100 + 150  # real tokens (the output leaves pads out)
        assert outs[1].num_cached_tokens == 70
        want = reference_engine.generate_ids([system + doc + tail, other + tail], max_tokens=16)
        assert [list(o.outputs[0].token_ids) for o in outs] == want
        assert_plugin_ran(second.stats())
        # Bit for bit the first engine's KV: the loaded pages, saved again, give a's file.
        again = vllm_compat.call_engine_core(second.llm, "cascade_save_pages", store.get_chunk(a.chunk_id).pages,
                                             str(tmp_path / "again"))
        assert again[0]["sha256"] == json.loads((kv_dir / f"{a.chunk_id}.json").read_text())["files"]["0"]["sha256"]
        # c was saved anew: every file now passes the checks.
        assert all(s.problem is None for s in store.persistence.files.scan())
    finally:
        second.shutdown()
