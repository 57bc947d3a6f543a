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


class Parting(NamedTuple):
    prompt: int  # index in the runs
    position: int  # the first generated token that differs
    gap: float  # as Closeness.gap, for this prompt (inf: a token not in the other's top K)
    at_least: float  # a lower bound of the gap: the gap, or where it is inf, the chosen token's logprob
    #                  less that of the least likely of its run's top K (the other's token is below it)


def partings(a: list[Greedy], b: list[Greedy]) -> list[Parting]:
    """Where each prompt's tokens part in two greedy runs (prompts that never part are left out).

    >>> ref = Greedy([5, 6], [-0.1, -0.2], [{5: -0.1}, {6: -0.2, 8: -0.9}])
    >>> partings([Greedy([5, 7], [-0.1, -0.3], [{5: -0.1}, {7: -0.3, 6: -0.4}])], [ref])
    [Parting(prompt=0, position=1, gap=inf, at_least=0.7)]
    """
    found = []
    for i, (x, y) in enumerate(zip(a, b)):
        n = common_prefix(x, y)
        if n == min(len(x.ids), len(y.ids)):
            continue
        gaps = [(g.logprobs[n] - g.top[n][other],) * 2 if other in g.top[n]
                else (math.inf, g.logprobs[n] - min(g.top[n].values())) for g, other in ((x, y.ids[n]), (y, x.ids[n]))]
        found.append(Parting(i, n, max(gap for gap, _ in gaps), round(max(low for _, low in gaps), 6)))
    return found


def common_prefix(x: Greedy, y: Greedy) -> int:
    """Generated tokens two runs of one prompt have in common before they part."""
    return next((i for i, (s, t) in enumerate(zip(x.ids, y.ids)) if s != t), min(len(x.ids), len(y.ids)))


def closeness(a: list[Greedy], b: list[Greedy]) -> Closeness:
    """How far two greedy runs of the same prompts are (module doc). vLLM's own model tests accept a
    parting when each token is in the other's top logprobs; the gap says by how much."""
    prefixes = [common_prefix(x, y) for x, y in zip(a, b)]
    worst = max([0.0] + [abs(p - q) for x, y, n in zip(a, b, prefixes) for p, q in zip(x.logprobs[:n], y.logprobs[:n])])
    return Closeness(worst, prefixes, max([0.0] + [p.gap for p in partings(a, b)]))


def identical(got: Closeness, runs: list[Greedy]) -> int:
    """Prompts whose runs `got` compared agree on every token (`runs`: either side)."""
    return sum(n == len(run.ids) for n, run in zip(got.prefixes, runs))


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
