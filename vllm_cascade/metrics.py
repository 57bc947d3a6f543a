"""Prometheus metrics of the cascade backend, served by vLLM's own `/metrics`.

The counters are made in worker processes (see stats.py); this collector runs
in the API server and sums what the workers wrote, at scrape time. vLLM's
`/metrics` reads prometheus_client's default registry, where the plugin
registers the collector (with `--api-server-count > 1` vLLM switches to a
multiprocess registry and these metrics are not exported).

    vllm:cascade_steps_total                      steps planned
    vllm:cascade_steps_by_levels_total{levels}    steps by number of levels
    vllm:cascade_kv_bytes_read_total              KV bytes attention read
    vllm:cascade_kv_bytes_flat_total              what flat attention would read
    vllm:cascade_kv_bytes_saved_total             the difference
    vllm:cascade_level_pages_total{level}         KV pages read per level (0, 1, ..., own)
    vllm:cascade_level_queries_total{level}       query tokens that attended each level
    vllm:cascade_layer_calls_total{path}          attention calls by kernel path (eager calls; layers
                                                  replayed inside a FULL CUDA graph are not counted)
    vllm:cascade_build_seconds_total              host time planning steps (levels, work lists, uploads)
    vllm:cascade_build_seconds_by_kind_total{kind}  the same by step kind (decode, prefill)
    vllm:cascade_decode_plans_reused_total        decode steps that reused the last step's levels
    vllm:cascade_decode_worklists_advanced_total  decode steps whose work list was advanced, not built
    vllm:cascade_merge_inputs_total               partial results the exact merge combined, per layer (its
                                                  cost; the merge kernel's time is in benchmarks/RESULTS.md)
    vllm:cascade_merge_seconds_total              measured time of those merges where a layer call times it
                                                  (the CPU path), in vllm:cascade_merge_timed_calls_total calls
    vllm:cascade_chunk_steps_total                steps that read composed chunk pages (shifted or padded)

With the chunk HTTP API loaded (entrypoints/http.py), its registry too:

    vllm:cascade_chunks                           chunks registered now
    vllm:cascade_chunk_pages_pinned               KV pages chunks pin now
    vllm:cascade_chunk_registrations_total        chunks created (re-registering one is a hit)
    vllm:cascade_chunk_lookups_total              registrations and composition lookups
    vllm:cascade_chunk_hits_total                 of which found an existing chunk
    vllm:cascade_chunk_hit_rate                   hits / lookups since the start
    vllm:cascade_chunk_evictions_total            chunks evicted (LRU) to make room
    vllm:cascade_chunk_deletions_total            chunks deleted
    vllm:cascade_chunk_compositions_total         composed requests (chunks + tail) vLLM prefilled
    vllm:cascade_chunk_composed_tokens_total      chunk tokens in those requests' prompts
    vllm:cascade_chunk_reused_tokens_total        of which vLLM's prefix cache served (measured:
                                                  each request's num_cached_tokens, capped at its
                                                  chunk tokens)
    vllm:cascade_chunk_reuse_rate                 reused / composed chunk tokens since the start
    vllm:cascade_chunk_reused_kv_bytes_total      KV bytes those reused tokens did not compute again:
                                                  the measured reused tokens x the KV bytes per token
                                                  of the model config (a known constant)
"""

from __future__ import annotations

import sys

from vllm_cascade.stats import get_stats

_registered = False


class CascadeCollector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = get_stats()

        def counter(name: str, doc: str, value: float | None = None, label: str | None = None,
                    values: dict | None = None) -> CounterMetricFamily:
            family = CounterMetricFamily(f"vllm:cascade_{name}", doc, labels=[label] if label else None)
            if label:
                for key, v in sorted((values or {}).items()):
                    family.add_metric([key], v)
            else:
                family.add_metric([], value)
            return family

        yield counter("steps", "Attention steps planned by the cascade backend.", stats["steps"])
        yield counter("steps_by_levels", "Steps by number of cascade levels.", label="levels", values=stats["levels"])
        yield counter("kv_bytes_read", "KV cache bytes read by attention.", stats["kv_bytes_read"])
        yield counter("kv_bytes_flat", "KV cache bytes flat attention would have read.", stats["kv_bytes_flat"])
        yield counter("kv_bytes_saved", "KV cache bytes not read thanks to cascade levels.", stats["kv_bytes_saved"])
        yield counter("level_pages", "KV pages read per level, per layer.", label="level", values=stats["level_pages"])
        yield counter("level_queries", "Query tokens that attended each level.", label="level",
                      values=stats["level_queries"])
        yield counter("layer_calls", "Attention layer calls by kernel path.", label="path", values=stats["paths"])
        yield counter("build_seconds", "Host time the cascade metadata builder spent planning steps.",
                      stats["build_ns"] / 1e9)
        yield counter("build_seconds_by_kind", "Host time of the cascade metadata builder by step kind.",
                      label="kind", values={k: v / 1e9 for k, v in stats["build_ns_by_kind"].items()})
        yield counter("decode_plans_reused", "Decode steps that reused the previous step's cascade levels "
                      "(same requests).", stats["plans_reused"])
        yield counter("decode_worklists_advanced", "Decode steps whose kernel work list was the previous one "
                      "advanced by a token instead of built.", stats["worklists_advanced"])
        yield counter("merge_inputs", "Partial attention results merged by log-sum-exp, per layer (one per "
                      "level a query token attended, or per KV run on the fused GPU path).", stats["merge_inputs"])
        yield counter("merge_seconds", "Measured time of the exact merge of levels, in the layer calls that time it "
                      "(the CPU path; GPU kernels are not timed here).", stats["merge_ns"] / 1e9)
        yield counter("merge_timed_calls", "Layer calls with more than one level whose merge time is in "
                      "merge_seconds.", stats["merge_timed_calls"])
        yield counter("chunk_steps", "Steps whose attention read chunk pages at shifted positions or with page "
                      "padding (composed requests).", stats["chunk_steps"])
        yield from self._chunk_metrics(counter)

    @staticmethod
    def _chunk_metrics(counter):
        http = sys.modules.get("vllm_cascade.entrypoints.http")
        service = getattr(http, "ACTIVE_SERVICE", None)
        if service is None:
            return
        from prometheus_client.core import GaugeMetricFamily

        from vllm_cascade.vllm_compat import kv_bytes_per_token

        chunks = service.stats()
        yield GaugeMetricFamily("vllm:cascade_chunks", "Chunks registered now.", chunks["chunks"])
        yield GaugeMetricFamily("vllm:cascade_chunk_pages_pinned", "KV pages chunks pin now.", chunks["pages_pinned"])
        for name in ("registrations", "lookups", "hits", "evictions", "deletions"):
            yield counter(f"chunk_{name}", f"Chunk registry {name}.", chunks[name])
        yield GaugeMetricFamily("vllm:cascade_chunk_hit_rate", "Share of chunk lookups (registrations and "
                                "compositions) that found a registered chunk since the start (hits / lookups).",
                                chunks["hit_rate"])
        yield counter("chunk_compositions", "Composed requests (chunks + tail) vLLM prefilled.", chunks["compositions"])
        yield counter("chunk_composed_tokens", "Chunk tokens in composed requests' prompts.", chunks["chunk_tokens"])
        yield counter("chunk_reused_tokens", "Composed chunk tokens vLLM's prefix cache served instead of computing "
                      "them (measured from each request's num_cached_tokens).", chunks["reused_tokens"])
        yield GaugeMetricFamily("vllm:cascade_chunk_reuse_rate", "Share of composed chunk tokens reused since the "
                                "server started (reused_tokens / composed_tokens).", chunks["chunk_reuse_rate"])
        yield counter("chunk_reused_kv_bytes", "KV cache bytes chunk reuse did not compute again: measured reused "
                      "tokens x KV bytes per token (layers x 2 x KV heads x head size x KV dtype size, from the "
                      "model config).", chunks["reused_tokens"] * kv_bytes_per_token(service.engine.vllm_config))


def register_collector() -> None:
    global _registered
    if _registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(CascadeCollector())
    _registered = True
