"""Host time of one step's planning for the Triton decode path, no GPU needed.

What the metadata builder does per decode step besides reading the block table:
the planner (or the reuse of the last decode step's levels), the stats, the work list and its upload buffer (TritonCascade on
the CPU device: the same host work, the copy is host to host). Mean over 300
steps after a warm-up; host timings are noisy (30% between runs here), so
compare before and after in one sitting on one machine.

    python benchmarks/host_bench.py
"""

import time

import numpy as np
import torch

from vllm_cascade.attention.plan import DecodePlanReuse, flat_plan, plan_cascade
from vllm_cascade.ops.triton_cascade import TritonCascade
from vllm_cascade.stats import AttentionStats

def case(b, prefix, own, page=16, shared=True):
    sp, op = prefix // page, -(-own // page)
    if shared:
        table = np.array([list(range(sp)) + [sp + r * op + i for i in range(op)] for r in range(b)], dtype=np.int32)
    else:
        table = np.array([[r * (sp + op) + i for i in range(sp + op)] for r in range(b)], dtype=np.int32)
    seq = np.full(b, prefix + own); qsl = np.arange(b + 1)
    return table, seq, qsl

def bench(name, b, prefix, own, shared, reps=300, reuse_key=None):
    table, seq, qsl = case(b, prefix, own, shared=shared)
    tc = TritonCascade(16, 8, 16, 0.1, device="cpu", capacity={"tokens": 512, "rows": 4096, "items": 4096})
    st = AttentionStats()
    bt = torch.from_numpy(table)
    ql = np.ones(b, dtype=np.int64)
    reuse = DecodePlanReuse()
    def step():
        plan = reuse.get(reuse_key, seq, 16, 0.1)
        if plan is None:
            plan = plan_cascade(table, seq, ql, 16, 3, 64, 0.1) if shared else flat_plan(seq, 16)
            reuse.put(reuse_key, plan, seq)
        lp, lq = plan.level_summary(ql)
        st.record_step(plan.num_levels, lp, lq, plan.flat_pages_read, 1000)
        tc.plan(plan, bt, seq, qsl)
        return plan
    for _ in range(20): step()
    t = {}
    t0 = time.perf_counter()
    for _ in range(reps): step()
    total = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps): plan = plan_cascade(table, seq, ql, 16, 3, 64, 0.1) if shared else flat_plan(seq, 16)
    t["plan"] = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps): tc.plan(plan, bt, seq, qsl)
    t["kernel.plan"] = (time.perf_counter() - t0) / reps * 1e6
    print(f"{name:<32} total {total:7.0f} us  " + "  ".join(f"{k} {v:6.0f}" for k, v in t.items()))

if __name__ == "__main__":
    bench("shared b64 8192+192", 64, 8192, 192, True)
    bench("shared b64 8192+192, plan reused", 64, 8192, 192, True, reuse_key="same requests")
    bench("flat b64 4096+256", 64, 4096, 256, False)
    bench("flat b1 128+512", 1, 128, 512, False)
