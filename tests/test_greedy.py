"""vllm_cascade.testing.greedy: how the GPU tests compare two greedy runs."""

from __future__ import annotations

import math

from vllm_cascade.testing.greedy import Closeness, Greedy, closeness


def test_closeness_tells_near_ties_from_sure_partings():
    ref = Greedy([5, 6, 7], [-0.1, -0.2, -0.3], [{5: -0.1, 9: -3.0}, {6: -0.2, 8: -0.25}, {7: -0.3}])
    tie = Greedy([5, 8, 1], [-0.12, -0.21, -0.5], [{5: -0.12}, {8: -0.21, 6: -0.3}, {1: -0.5}])
    got = closeness([tie], [ref])
    assert got.prefixes == [1] and math.isclose(got.delta, 0.02) and math.isclose(got.gap, 0.09)
    sure = Greedy([9], [-0.5], [{9: -0.5, 5: -0.7}])  # parts where the reference gave its token -3.0
    assert math.isclose(closeness([sure], [ref]).gap, 2.9)
    assert closeness([Greedy([9], [-0.5], [{9: -0.5}])], [ref]).gap == math.inf  # not even in the top K
    assert closeness([ref], [ref]) == Closeness(0.0, [3], 0.0)
