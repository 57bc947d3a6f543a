"""The host mirror of model runner V2's block ids, on a stand-in with the same writer.

V2's BlockTables needs a GPU; the wrapper only uses what the stand-in has:
num_kv_cache_groups, num_blocks.np, block_tables[i].gpu (shape),
redirect_writes_to_null_block, and append_block_ids itself.
"""

import random
from types import SimpleNamespace

import numpy as np
import torch

from vllm_cascade import vllm_compat


class StandInBlockTables:
    redirect_writes_to_null_block = False

    def __init__(self, groups: int, reqs: int, width: int) -> None:
        self.num_kv_cache_groups = groups
        self.num_blocks = SimpleNamespace(np=np.zeros((groups, reqs), dtype=np.int32))
        self.block_tables = [SimpleNamespace(gpu=torch.zeros(reqs, width, dtype=torch.int32)) for _ in range(groups)]

    def append_block_ids(self, req_index, new_block_ids, overwrite):  # what V2 writes to the device
        for i in range(self.num_kv_cache_groups):
            start = 0 if overwrite else int(self.num_blocks.np[i, req_index])
            ids = [0] * len(new_block_ids[i]) if self.redirect_writes_to_null_block else new_block_ids[i]
            self.block_tables[i].gpu[req_index, start : start + len(ids)] = torch.tensor(ids, dtype=torch.int32)
            self.num_blocks.np[i, req_index] = start + len(ids)


def test_mirror_follows_every_write():
    vllm_compat.mirror_block_tables(StandInBlockTables)
    vllm_compat.mirror_block_tables(StandInBlockTables)  # idempotent
    tables = StandInBlockTables(groups=2, reqs=8, width=40)
    rng = random.Random(0)
    for step in range(300):
        req = rng.randrange(8)
        overwrite = rng.random() < 0.1
        room = 40 - (0 if overwrite else int(tables.num_blocks.np[:, req].max()))
        n = rng.randrange(0, min(room, 4) + 1)
        tables.redirect_writes_to_null_block = rng.random() < 0.05
        tables.append_block_ids(req, tuple([rng.randrange(1, 10_000) for _ in range(n)] for _ in range(2)), overwrite)
    mirror = vllm_compat.host_block_ids()
    for group in range(2):
        counts = tables.num_blocks.np[group]
        device = tables.block_tables[group].gpu.numpy()
        for req in range(8):
            assert (mirror.tables[group][req, : counts[req]] == device[req, : counts[req]]).all()
    req_idx = np.array([5, 1, 1, 7])
    assert (mirror.rows(0, req_idx) == mirror.tables[0][req_idx]).all()
