"""Exact binomial arithmetic for accuracies against chance: tails, a test, intervals. Pure functions of counts.

An accuracy of ``k`` right out of ``n`` questions with ``1 / choices`` chance is judged by
:func:`binomial_test` (one-sided: the probability that guessing scores ``k`` or more) and reported with
:func:`wilson_interval`; :func:`chance_range` is the range a guesser lands in with a given probability, which is how
a control is judged to be "at chance".
"""

from __future__ import annotations

import math

__all__ = ["binomial_pmf", "binomial_upper_tail", "binomial_test", "wilson_interval", "chance_range", "judge"]


def _check(k: int, n: int, p: float) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"the chance probability must be in (0, 1), got {p}")


def binomial_pmf(k: int, n: int, p: float) -> float:
    """``P(X = k)`` for ``X ~ Binomial(n, p)``, through log-gamma so that large ``n`` neither overflows nor
    underflows to a wrong zero before it should."""
    _check(k, n, p)
    log = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
           + k * math.log(p) + (n - k) * math.log1p(-p))
    return math.exp(log)


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` (exact sum of the probabilities)."""
    _check(min(max(k, 0), n), n, p)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, math.fsum(binomial_pmf(i, n, p) for i in range(k, n + 1)))


def binomial_test(k: int, n: int, p: float) -> float:
    """One-sided p-value of ``k`` successes in ``n`` against "no better than ``p``": ``P(X >= k)``."""
    return binomial_upper_tail(k, n, p)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` at ``level`` (two-sided)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = _normal_quantile(0.5 + level / 2)
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_range(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """The central ``level`` range ``[lo, hi]`` of ``Binomial(n, p)`` counts: the largest ``lo`` with
    ``P(X < lo) <= (1 - level) / 2`` and the smallest ``hi`` with ``P(X > hi) <= (1 - level) / 2``. A guesser's
    count falls inside with probability at least ``level``."""
    _check(0, n, p)
    alpha = (1 - level) / 2
    cdf, lo = 0.0, 0
    for i in range(n + 1):
        if cdf + binomial_pmf(i, n, p) > alpha:
            lo = i
            break
        cdf += binomial_pmf(i, n, p)
    tail, hi = 0.0, n
    for i in range(n, -1, -1):
        if tail + binomial_pmf(i, n, p) > alpha:
            hi = i
            break
        tail += binomial_pmf(i, n, p)
    return lo, hi


def judge(correct: int, total: int, chance: float) -> dict:
    """The statistics the demonstration reports for one accuracy: ``accuracy``, ``ci95`` (Wilson), ``p_value``
    (one-sided exact binomial test against ``chance``) and ``chance_range99`` (counts, :func:`chance_range`)."""
    return {"accuracy": correct / total, "ci95": wilson_interval(correct, total, 0.95),
            "p_value": binomial_test(correct, total, chance), "chance_range99": chance_range(total, chance, 0.99)}


def _normal_quantile(q: float) -> float:
    """Standard normal quantile by bisection on ``erf`` (exact to float precision; only a few calls are made)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
