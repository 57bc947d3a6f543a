"""Greedy runs with their top logprobs, and how far two runs of the same prompts are.

Two correct bf16 runs of one model may choose different tokens where the two
most likely ones are nearly tied; a wrong run parts where the other was sure.
So a comparison reads, besides the logprobs on the common prefix, the gap
between the two tokens where the runs part, in both distributions. The GPU
tests (tests/test_fused_qwen3.py, tests/test_gpu_chunks.py),
benchmarks/gpu_check.py and benchmarks/model_check.py judge runs this way;
`bf16_problems` is the rule a bf16 run is held to: as accurate as stock bf16
against an fp32 reference.

Example:
    >>> ref = Greedy([5, 6], [-0.1, -0.2], [{5: -0.1}, {6: -0.2, 8: -0.25}])
    >>> ours = Greedy([5, 8], [-0.12, -0.21], [{5: -0.12}, {8: -0.21, 6: -0.3}])
    >>> got = closeness([ours], [ref])
    >>> got.prefixes, round(got.delta, 2), round(got.gap, 2)
    ([1], 0.02, 0.09)
"""

from __future__ import annotations

import math
from typing import NamedTuple

TOP_K = 5  # logprobs per generated token to request, so a parting can be judged in both distributions


class Greedy(NamedTuple):
    ids: list[int]
    logprobs: list[float]  # of each generated token
    top: list[dict[int, float]]  # the most likely tokens of each step (TOP_K and the chosen one), with logprobs

    @classmethod
    def from_dict(cls, run: dict) -> Greedy:
        """A run from its `_asdict()` after a JSON round trip (which made the token ids strings)."""
        return cls(run["ids"], run["logprobs"], [{int(t): lp for t, lp in step.items()} for step in run["top"]])


def sampling_params(max_tokens: int):
    """Greedy decoding of `max_tokens` tokens (no EOS stop) with TOP_K logprobs: what `from_outputs` reads."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_K)


def from_outputs(outs) -> list[Greedy]:
    """vLLM's RequestOutputs (sampled with `sampling_params`) -> one Greedy per request."""
    result = []
    for o in outs:
        ids, steps = list(o.outputs[0].token_ids), o.outputs[0].logprobs
        result.append(Greedy(ids, [step[t].logprob for t, step in zip(ids, steps)],
                             [{t: lp.logprob for t, lp in step.items()} for step in steps]))
    return result


class Closeness(NamedTuple):
    delta: float  # max |logprob difference| of the greedy tokens over each prompt's common prefix
    prefixes: list[int]  # each prompt's common prefix, in tokens
    gap: float  # where a prompt's tokens part: how much less likely the other side's token is, in the
    #             distribution that did not pick it (the larger of the two sides; inf: not in its top K)


def closeness(a: list[Greedy], b: list[Greedy]) -> Closeness:
    """How far two greedy runs of the same prompts are (module doc). vLLM's own model tests accept a
    parting when each token is in the other's top logprobs; the gap says by how much."""
    worst, gap, prefixes = 0.0, 0.0, []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x.ids, y.ids)) if s != t), min(len(x.ids), len(y.ids)))
        prefixes.append(n)
        worst = max([worst] + [abs(p - q) for p, q in zip(x.logprobs[:n], y.logprobs[:n])])
        if n < min(len(x.ids), len(y.ids)):
            gap = max(gap, x.logprobs[n] - x.top[n].get(y.ids[n], -math.inf),
                      y.logprobs[n] - y.top[n].get(x.ids[n], -math.inf))
    return Closeness(worst, prefixes, gap)


LOGPROB_TOL = 0.1  # nats: how much further from fp32 than stock bf16 a bf16 run may be


def bf16_problems(ours_fp32: Closeness, stock_fp32: Closeness) -> list[str]:
    """Why a bf16 run breaks the bf16 rule (empty: it holds), from its closeness to the fp32
    reference and stock bf16's: it must be as accurate as stock bf16, at most LOGPROB_TOL further
    from fp32, and part from fp32 at near-ties only (2 tol apart at most, tol = max(LOGPROB_TOL,
    stock's distance): each of the two tokens may move by tol).

    Its distance from stock bf16 is not judged: two bf16 runs each d from fp32 may be 2d apart,
    and on deep models they are, even two stock backends (RESULTS.md, thirteenth session, two runs
    of the same prompts on a 28-layer model: FLASHINFER 0.23 from FLASH_ATTN, FLASH_ATTN 0.17 from
    fp32).

    >>> stock, ours = Closeness(0.15, [8], 0.0), Closeness(0.3, [8], 0.2)
    >>> bf16_problems(ours, stock)
    ["0.3000 from fp32 > stock bf16's 0.1500 + 0.1"]
    >>> bf16_problems(Closeness(0.2, [8], 0.2), stock)
    []
    """
    tol = max(LOGPROB_TOL, stock_fp32.delta)
    problems = []
    if ours_fp32.delta > stock_fp32.delta + LOGPROB_TOL:
        problems.append(f"{ours_fp32.delta:.4f} from fp32 > stock bf16's {stock_fp32.delta:.4f} + {LOGPROB_TOL}")
    if ours_fp32.gap > 2 * tol:
        problems.append(f"parts from fp32 where the tokens are {ours_fp32.gap:.4f} apart > 2 tol {2 * tol:.4f}")
    return problems
