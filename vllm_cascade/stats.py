"""Counters of what the cascade backend did in this process.

Updated once per step by the metadata builder and once per layer call by the
impl (a Python integer add). With `VLLM_CASCADE_STATS_DIR` set, each process
also writes its counters to `<dir>/attention-<pid>.json` after every step, so
that tests (and people) can see what ran inside worker processes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class AttentionStats:
    steps: int = 0  # metadata builds (one per step and KV-cache group)
    cascade_steps: int = 0  # of which ran more than one level
    layer_calls: int = 0  # attention forward calls that computed something
    pages_read: int = 0  # KV pages read per layer, summed over steps
    flat_pages_read: int = 0  # what flat attention would have read
    levels: Counter = field(default_factory=Counter)  # steps by number of levels
    paths: Counter = field(default_factory=Counter)  # layer calls by kernel path

    def record_step(self, num_levels: int, pages_read: int, flat_pages_read: int) -> None:
        self.steps += 1
        self.cascade_steps += num_levels > 1
        self.pages_read += pages_read
        self.flat_pages_read += flat_pages_read
        self.levels[num_levels] += 1
        _dump(self)

    def snapshot(self) -> dict:
        data = asdict(self)
        data["levels"] = {str(k): v for k, v in self.levels.items()}
        data["paths"] = dict(self.paths)
        data["pid"] = os.getpid()
        return data


STATS = AttentionStats()


def _dump(stats: AttentionStats) -> None:
    out_dir = os.environ.get("VLLM_CASCADE_STATS_DIR")
    if not out_dir:
        return
    path = os.path.join(out_dir, f"attention-{os.getpid()}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(stats.snapshot(), f)
    os.replace(tmp, path)


def read_stats_dir(out_dir: str) -> list[dict]:
    """Counters written by every process that used the backend."""
    found = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("attention-") and name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                found.append(json.load(f))
    return found
