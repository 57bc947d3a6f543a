import numpy as np
import pytest
from sharing import random_batch

from vllm_cascade.attention.plan import plan_cascade


@pytest.mark.parametrize("seed", range(200))
def test_every_page_attended_exactly_once(seed):
    rng = np.random.default_rng(seed)
    page = int(rng.choice([4, 16]))
    table, seq_lens, query_lens, _ = random_batch(rng, page)
    max_levels = int(rng.integers(1, 5))
    plan = plan_cascade(table, seq_lens, query_lens, page, max_levels, min_saved_pages=int(rng.integers(1, 4)),
                        min_saved_fraction=0.0)
    assert plan.num_levels <= max_levels
    covered = {r: [] for r in range(len(seq_lens))}
    for level, segments in enumerate(plan.shared):
        for seg in segments:
            assert seg.level == level and len(seg.rows) >= 2 and len(seg.pages) >= 1
            for r in seg.rows:
                idx = range(seg.first_page, seg.first_page + len(seg.pages))
                assert table[r, list(idx)].tolist() == seg.pages.tolist()  # same physical pages
                # shared pages lie wholly before the row's first query token: no mask needed
                assert (seg.first_page + len(seg.pages)) * page <= seq_lens[r] - query_lens[r]
                covered[r].extend(idx)
    pages_read = sum(len(s.pages) for lvl in plan.shared for s in lvl)
    for r, idx in covered.items():
        num_pages = -(-seq_lens[r] // page)
        idx = idx + list(range(plan.own_first_page[r], num_pages))
        assert sorted(idx) == list(range(num_pages))  # each (row, page) exactly once
        pages_read += num_pages - plan.own_first_page[r]
    assert plan.pages_read == pages_read <= plan.flat_pages_read


def test_prefix_for_all_and_documents_for_groups():
    page = 16
    system = list(range(100, 132))  # 512 tokens for all
    docs = [list(range(1000 * (d + 1), 1000 * (d + 1) + 256)) for d in range(4)]  # 4096 tokens each
    table = np.array([system + docs[r // 16] + [50_000 + 8 * r + i for i in range(8)] for r in range(64)])
    seq_lens = np.full(64, (32 + 256) * page + 65)
    plan = plan_cascade(table, seq_lens, np.ones(64, dtype=int), page, max_levels=3)
    assert plan.num_levels == 3
    assert [len(s.rows) for s in plan.shared[0]] == [64]
    assert sorted(len(s.rows) for s in plan.shared[1]) == [16] * 4
    assert plan.flat_pages_read / plan.pages_read > 10


def test_two_levels_fold_group_pages_into_a_single_shared_level():
    table = np.array([[1, 2, 10 + r] for r in range(8)] + [[1, 3, 20 + r] for r in range(8)])
    seq_lens = np.full(16, 40)
    plan = plan_cascade(table, seq_lens, np.ones(16, dtype=int), 16, max_levels=2, min_saved_pages=1,
                        min_saved_fraction=0)
    assert plan.num_levels == 2 and [s.pages.tolist() for s in plan.shared[0]] == [[1]]
    assert plan.own_first_page.tolist() == [1] * 16


def test_little_sharing_runs_flat():
    table = np.array([[1, 2, 3], [1, 4, 5]])
    plan = plan_cascade(table, np.array([40, 40]), np.array([1, 1]), 16)  # saves 1 page of 6
    assert plan.is_flat and plan.pages_read == plan.flat_pages_read == 6


@pytest.mark.parametrize("seed", range(40))
def test_decode_steps_reuse_the_plan_planning_again_would_make(seed):
    """Decode steps of the same requests: the reused plan equals a fresh one, step after step,
    as each row's own pages grow (and sharing may stop paying)."""
    from vllm_cascade.attention.plan import DecodePlanReuse

    rng = np.random.default_rng(seed)
    page = int(rng.choice([4, 16]))
    table, seq_lens, _, next_page = random_batch(rng, page, max_rows=20)
    table = np.concatenate([table, np.zeros((len(table), 64), table.dtype)], axis=1)
    ones = np.ones(len(seq_lens), np.int64)
    settings = dict(max_levels=int(rng.integers(2, 4)), min_saved_pages=int(rng.integers(1, 8)),
                    min_saved_fraction=float(rng.choice([0.0, 0.3])))
    reuse = DecodePlanReuse()
    reused_steps = 0
    for step in range(3 * page):
        fresh = plan_cascade(table, seq_lens, ones, page, **settings)
        plan = reuse.get("same requests", seq_lens, page, settings["min_saved_fraction"])
        if plan is None:
            reuse.put("same requests", fresh, seq_lens.copy())
        else:
            reused_steps += 1
            assert [[(s.rows.tolist(), s.first_page, s.pages.tolist()) for s in lvl] for lvl in plan.shared] == \
                   [[(s.rows.tolist(), s.first_page, s.pages.tolist()) for s in lvl] for lvl in fresh.shared]
            assert (plan.own_first_page.tolist(), plan.pages_read, plan.flat_pages_read) == \
                   (fresh.own_first_page.tolist(), fresh.pages_read, fresh.flat_pages_read)
        # One decode step: each row writes a token; a row whose last page fills gets a fresh page.
        for r in range(len(seq_lens)):
            if seq_lens[r] % page == 0:
                table[r, seq_lens[r] // page] = next_page
                next_page += 1
        seq_lens = seq_lens + 1
    assert reused_steps == 3 * page - 1
    assert reuse.get("other requests", seq_lens, page, 0.0) is None
