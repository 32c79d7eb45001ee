"""The timing helper the benchmarks report ratios with."""
from collections import Counter

from hyperflow_ext.measure import interleaved_medians, interleaved_times


def test_interleaved_rounds_rotate_so_each_callable_follows_every_other_equally():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times, rounds = interleaved_times(fns, budget_s=0.0, min_rounds=6, max_rounds=6)
    assert rounds == 6 and [len(t) for t in times] == [6, 6, 6]
    timed = calls[6:]  # after one warm-up call each and the sizing round
    assert Counter(timed) == {0: 6, 1: 6, 2: 6}
    followers = Counter(zip(timed, timed[1:]))
    assert {pair for pair in followers if pair[0] != pair[1]} == {(a, b) for a in range(3) for b in range(3) if a != b}
    # within a round the order is a rotation of 0, 1, 2
    assert [timed[3 * r:3 * r + 3] for r in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_interleaved_medians_runs_exactly_the_rounds_asked():
    calls = []
    medians = interleaved_medians([lambda: calls.append(0), lambda: calls.append(1)], rounds=5)
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    assert len(calls) == 2 + 2 + 5 * 2
