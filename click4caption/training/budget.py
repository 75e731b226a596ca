"""Fitting a run's length to a time budget (``run.time_budget_s``).

A recipe that must finish within a wall-clock budget cannot know its step rate before it
runs: the same configuration trains 1.5x slower on one 2-core machine than on another
(models/shapes/REPORT.md). With a budget, the trainer measures its rate as it goes and
refits the number of iterations at every log line (once the rate was measured over
``RATE_MIN_SHARE`` of the budget): as many as the measured rate lets
finish in the time left, never more than ``max_epoch * iters_per_epoch``. The learning
rate's cosine then runs over the fitted length, so a shortened run still ends at
``min_lr``.
"""
from __future__ import annotations

import time
from typing import Callable

#: share of the time left kept in hand for the rate's drift and the last checkpoint
SAFETY = 0.01
#: iterations after the start (or a resume) that the rate ignores: the first steps include
#: the loader's start and one-off allocations
RATE_SKIP = 20
#: share of the budget the rate is measured over before the first refit: a rate from a few
#: seconds after the start runs low, and a length cut on it changes the cosine (and so the
#: weights) of a run that the steady rate fits in full (run 49: 17,913 of 18,000 iterations
#: fitted at iteration 50, all 18,000 at the next log lines)
RATE_MIN_SHARE = 0.02


def fit_total(done: int, configured: int, rate_its_per_s: float, left_s: float, safety: float = SAFETY) -> int:
    """Total iterations of a run that has ``done`` of them, ``left_s`` seconds left and
    runs ``rate_its_per_s``.

    Returns ``configured`` when it fits; otherwise ``done`` plus what fits in
    ``left_s * (1 - safety)`` (``done`` itself when no time is left), so never less than
    ``done`` and never more than ``configured``.
    """
    if rate_its_per_s <= 0:
        return configured
    more = int(rate_its_per_s * max(left_s, 0.0) * (1.0 - safety))
    return max(done, min(configured, done + more))


class TimeBudget:
    """Clock of a budgeted run: call :meth:`refit` after an iteration to get the run's
    (new) total."""

    def __init__(self, budget_s: float, start_iteration: int, configured: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.budget_s = float(budget_s)
        self.configured = int(configured)
        self.clock = clock
        self.t_start = clock()
        self.start_iteration = int(start_iteration)
        self._mark: tuple[int, float] | None = None  # (iteration, time) the rate is measured from

    def refit(self, done: int, total: int) -> int:
        """The run's total after ``done`` iterations (``total`` until the rate is known)."""
        now = self.clock()
        if now - self.t_start >= self.budget_s:
            return done  # out of time: stop here
        if self._mark is None:
            if done - self.start_iteration >= RATE_SKIP:
                self._mark = (done, now)
            return total
        its, seconds = done - self._mark[0], now - self._mark[1]
        if its <= 0 or seconds <= 0 or seconds < RATE_MIN_SHARE * self.budget_s:
            return total
        return fit_total(done, self.configured, its / seconds, self.budget_s - (now - self.t_start))

    def elapsed(self) -> float:
        return self.clock() - self.t_start
