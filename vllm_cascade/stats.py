"""Counters of what the cascade backend did, per process, and their sum over a run.

Workers update `STATS` once per step (the metadata builder) and once per layer
call (the impl; a Python integer add). Each worker writes its counters to
`$CASCADE_STATS_DIR/attention-<pid>.json`, at most once per
`CASCADE_STATS_INTERVAL_S` seconds (default 1) from the step, and a daemon
thread writes what changed since within 0.25 s, so the last steps before an
engine is shut down (its processes are not always given an exit) are counted.
The plugin gives every vLLM run a fresh directory (spawned engine and worker processes inherit the variable),
so the front process (API server, `LLM`) can sum them: `/metrics` through
`vllm_cascade.metrics`, Python through `get_stats()`.

Example:
    >>> s = AttentionStats()
    >>> s.record_step(num_levels=2, level_pages=[10, 3], level_queries=[8, 8], flat_pages=80, page_bytes=1024)
    >>> summarize([s.snapshot()])["kv_bytes_saved"]
    68608
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

STATS_DIR_ENV = "CASCADE_STATS_DIR"
INTERVAL_ENV = "CASCADE_STATS_INTERVAL_S"
_COUNTERS = ("steps", "cascade_steps", "layer_calls", "pages_read", "flat_pages_read", "kv_bytes_read",
             "kv_bytes_flat", "build_ns", "plans_reused",
             "worklists_advanced", "merge_inputs", "merge_ns", "merge_timed_calls", "chunk_steps",
             "query_rope_calls")
_COUNTERS_BY_KEY = ("levels", "level_pages", "level_queries", "paths", "model_steps", "block_table_reads",
                    "steps_by_kind", "build_ns_by_kind")


@dataclass
class AttentionStats:
    steps: int = 0  # metadata builds (one per step and KV-cache group)
    cascade_steps: int = 0  # of which ran more than one level
    layer_calls: int = 0  # attention forward calls that computed something
    pages_read: int = 0  # KV pages one layer reads, summed over steps
    flat_pages_read: int = 0  # what flat attention would have read
    kv_bytes_read: int = 0  # KV bytes read over all layers of the group
    kv_bytes_flat: int = 0  # what flat attention would have read
    build_ns: int = 0  # host time in the metadata builder (planning, work lists, uploads), measured
    plans_reused: int = 0  # decode steps that reused the previous step's levels (same requests)
    worklists_advanced: int = 0  # decode steps whose work list was the previous one, one token further
    merge_inputs: int = 0  # partial attention results merged by log-sum-exp (per layer), summed over steps
    merge_ns: int = 0  # measured time of those merges, in the layer calls that timed it (the CPU path)
    merge_timed_calls: int = 0  # layer calls with more than one level whose merge time is in merge_ns
    chunk_steps: int = 0  # builds whose step read chunk pages composed at shifted positions or padded
    query_rope_calls: int = 0  # layer calls whose query came before RoPE (config query_rope="backend")
    steps_by_kind: Counter = field(default_factory=Counter)  # builds by step kind ("decode", "prefill")
    build_ns_by_kind: Counter = field(default_factory=Counter)  # build_ns by step kind
    levels: Counter = field(default_factory=Counter)  # steps by number of levels
    level_pages: Counter = field(default_factory=Counter)  # pages read per level ("0", "1", ..., "own")
    level_queries: Counter = field(default_factory=Counter)  # query tokens attending each level
    paths: Counter = field(default_factory=Counter)  # layer calls by kernel path
    model_steps: Counter = field(default_factory=Counter)  # forward calls of the plugin's model classes
    block_table_reads: Counter = field(default_factory=Counter)  # host block tables by source (cpu, host_mirror, device_copy)
    _last_dump: float = field(default=0.0, repr=False)
    _dirty: bool = field(default=False, repr=False)
    _flusher: threading.Thread | None = field(default=None, repr=False)
    # The flusher thread snapshots while the step runs: one record's counters change together (and a
    # Counter is never copied while a new key goes in).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_step(
        self, num_levels: int, level_pages: list[int], level_queries: list[int], flat_pages: int, page_bytes: int
    ) -> None:
        """One step's plan; `level_*` lists end with the own level; `page_bytes` covers all layers."""
        pages = sum(level_pages)
        names = [str(i) for i in range(len(level_pages) - 1)] + ["own"]
        with self._lock:
            self.steps += 1
            self.cascade_steps += num_levels > 1
            self.pages_read += pages
            self.flat_pages_read += flat_pages
            self.kv_bytes_read += pages * page_bytes
            self.kv_bytes_flat += flat_pages * page_bytes
            self.levels[str(num_levels)] += 1
            self.level_pages.update(dict(zip(names, level_pages)))
            self.level_queries.update(dict(zip(names, level_queries)))
            self._dirty = True
        self.maybe_dump()
        if self._flusher is None and os.environ.get(STATS_DIR_ENV):
            self._flusher = threading.Thread(target=self._flush_loop, name="cascade-stats", daemon=True)
            self._flusher.start()

    def record_layer_call(self, path: str, query_rope: bool, merge_ns: int | None = None) -> None:
        """One attention call that computed something (eager calls; a replayed CUDA graph calls no
        Python): its kernel path, whether it rotated the query itself, the merge time it measured."""
        with self._lock:
            self.layer_calls += 1
            self.paths[path] += 1
            self.query_rope_calls += query_rope
            if merge_ns is not None:
                self.merge_ns += merge_ns
                self.merge_timed_calls += 1
            self._dirty = True

    def record_build(self, kind: str, spent_ns: int) -> None:
        """The builder's host time for one step of `kind` ("decode" or "prefill")."""
        with self._lock:
            self.build_ns += spent_ns
            self.build_ns_by_kind[kind] += spent_ns
            self.steps_by_kind[kind] += 1
            self._dirty = True  # the daemon thread writes it

    def _flush_loop(self) -> None:
        while True:
            time.sleep(0.25)
            if self._dirty:
                self.maybe_dump(force=True)

    def snapshot(self) -> dict:
        with self._lock:
            data = {k: getattr(self, k) for k in _COUNTERS}
            for k in _COUNTERS_BY_KEY:
                data[k] = dict(getattr(self, k))
        data["pid"] = os.getpid()
        return data

    def maybe_dump(self, force: bool = False) -> None:
        out_dir = os.environ.get(STATS_DIR_ENV)
        now = time.monotonic()
        if not out_dir or (not force and now - self._last_dump < float(os.environ.get(INTERVAL_ENV, "1"))):
            return
        self._last_dump = now
        self._dirty = False
        path = os.path.join(out_dir, f"attention-{os.getpid()}.json")
        tmp = f"{path}.{threading.get_ident()}.tmp"  # the step and the flusher thread may both write
        try:
            with open(tmp, "w") as f:
                json.dump(self.snapshot(), f)
            os.replace(tmp, path)
        except OSError:
            pass  # the run's directory is gone (its front process exited): nothing to report to


STATS = AttentionStats()
atexit.register(STATS.maybe_dump, force=True)


def ensure_stats_dir() -> str:
    """This run's stats directory: inherited, or made now (and removed at exit) by the front process."""
    if not os.environ.get(STATS_DIR_ENV):
        made = tempfile.mkdtemp(prefix="vllm-cascade-stats-")
        os.environ[STATS_DIR_ENV] = made
        atexit.register(shutil.rmtree, made, ignore_errors=True)
    return os.environ[STATS_DIR_ENV]


def read_stats_dir(out_dir: str) -> list[dict]:
    """Counters written by every process that used the backend."""
    found = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("attention-") and name.endswith(".json"):
            try:
                with open(os.path.join(out_dir, name)) as f:
                    found.append(json.load(f))
            except (OSError, ValueError):
                continue  # replaced while we read it
    return found


def summarize(per_process: list[dict]) -> dict:
    """Sum per-process counters; adds kv_bytes_saved."""
    total: dict = {k: sum(p.get(k, 0) for p in per_process) for k in _COUNTERS}
    for k in _COUNTERS_BY_KEY:
        total[k] = dict(sum((Counter(p.get(k, {})) for p in per_process), Counter()))
    total["kv_bytes_saved"] = total["kv_bytes_flat"] - total["kv_bytes_read"]
    total["processes"] = len(per_process)
    return total


def get_stats() -> dict:
    """What the cascade backend did in this run (all worker processes), e.g. after `LLM.generate`.

    Workers write at most once per CASCADE_STATS_INTERVAL_S seconds, so the
    last second of work may not be counted yet.
    """
    out_dir = os.environ.get(STATS_DIR_ENV)
    return summarize(read_stats_dir(out_dir) if out_dir and os.path.isdir(out_dir) else [])
