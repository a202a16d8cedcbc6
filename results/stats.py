"""Statistics for sweeps of units (subjects, datasets) × seeds: hierarchical bootstrap, paired comparisons,
multiplicity, tied ranks, critical differences, power and validity.

A sweep is a two-level design. A metric's value y[u, s] for unit u (a DreamBooth subject, or the dataset of a
controllable task) and seed s varies with the unit (some subjects are harder for every method) and with the seed.
Runs are therefore not i.i.d.: the subjects are the sample drawn from a population, the seeds are repetitions
within a subject. Every function here respects that:

- a *sample* is a pandas Series of values indexed by (unit, seed) — one value per run, repeated (unit, seed)
  pairs averaged;
- `blocks(sample)` groups it by unit into the independent *blocks* of the design. When a sample has a single
  unit (a controllable task has one dataset), its seeds are the blocks: the inference is then about seeds on
  that one dataset, which is all such a sweep can say;
- an estimate is the mean of the block means (each unit weighs the same, however many seeds it has).

Everything is numpy (and scipy.stats for distribution quantiles); random draws come from
`numpy.random.default_rng(seed)` with a fixed seed, so every number is reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sps

RESAMPLES = 10_000
CI_LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8
EXACT_FLIPS_UP_TO = 16  # all 2^n sign flips up to n = 16 units (65 536), random flips beyond
RANDOM_FLIPS = 20_000
STABILITY_RESAMPLES = 1_000
_CHUNK = 4_000_000  # resampled values held in memory at once


class Interval(NamedTuple):
    """A mean with its confidence interval; `n` is the number of blocks (units, or seeds for one unit)."""
    mean: float
    lo: float
    hi: float
    n: int


class Comparison(NamedTuple):
    """A paired comparison a − b: Δ with its CI, the sign-flip p-value (unadjusted), blocks and (unit, seed)
    pairs used."""
    delta: float
    lo: float
    hi: float
    p: float
    n: int
    pairs: int


class MDE(NamedTuple):
    """Minimum detectable paired difference: value (NaN with a reason when it cannot be computed), the pooled
    sd of per-unit paired differences it uses, the number of units n, and a reason or warning ("" if none)."""
    value: float
    sd: float
    n: int
    reason: str


class CriticalDifference(NamedTuple):
    """Friedman test and Nemenyi critical difference over N blocks and k methods (Demšar 2006)."""
    methods: list[str]
    avg_ranks: np.ndarray   # average rank per method, 1 = best
    n_blocks: int
    chi2: float             # Friedman χ²_F
    p: float                # its p-value (χ² with k − 1 df)
    cd: float               # Nemenyi critical difference
    q_alpha: float
    cliques: list[list[str]]  # maximal groups of methods whose average ranks differ by less than cd
    alpha: float


# ---------------------------------------------------------------- samples and blocks

def sample(values, units=None, seeds=None) -> pd.Series:
    """Values as a sample indexed by (unit, seed); NaNs dropped, repeated (unit, seed) pairs averaged.

    Without units every value is its own unit (i.i.d. data); without seeds each value gets its position.
    """
    values = np.asarray(values, dtype=float)
    units = np.arange(values.size) if units is None else np.asarray(units, dtype=object)
    seeds = np.arange(values.size) if seeds is None else np.asarray(seeds, dtype=object)
    units = np.array(["—" if _missing(u) else u for u in units], dtype=object)
    index = pd.MultiIndex.from_arrays([units, seeds], names=["unit", "seed"])
    s = pd.Series(values, index=index).dropna()
    if s.index.has_duplicates:
        s = s.groupby(level=["unit", "seed"], sort=False).mean()
    return s


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def blocks(s: pd.Series) -> list[np.ndarray]:
    """The independent blocks of a sample: per unit, its seeds' values; a single unit's seeds are the blocks."""
    if s.empty:
        return []
    units = s.index.get_level_values("unit")
    if units.nunique() == 1:
        return [np.array([v]) for v in s.to_numpy(dtype=float)]
    return [group.to_numpy(dtype=float) for _, group in s.groupby(level="unit", sort=False)]


def block_means(parts: list[np.ndarray]) -> np.ndarray:
    """The mean of each block (a unit's mean over its seeds)."""
    return np.array([p.mean() for p in parts])


def estimate(parts: list[np.ndarray]) -> float:
    """The point estimate of a mean: the mean over blocks of each block's mean (every unit weighs the same)."""
    return float(block_means(parts).mean()) if parts else math.nan


# ---------------------------------------------------------------- hierarchical bootstrap

def hierarchical_resamples(parts: list[np.ndarray], resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of `resamples` hierarchical bootstrap resamples of blocked data.

    One resample: draw n blocks (units) with replacement from the n blocks; within each drawn block draw its
    m_u values (seeds) with replacement from that block's m_u values; the resample's statistic is the mean of
    the drawn blocks' means — the same estimator as `estimate`. This is the two-stage ("units, then seeds
    within units") bootstrap of Davison & Hinkley (1997, §3.8). scipy.stats.bootstrap resamples one level
    only (i.i.d. observations, or paired columns), so it cannot express this; it is written here with numpy,
    vectorised over resamples (in chunks to bound memory).
    """
    x = np.full((len(parts), max(len(p) for p in parts)), np.nan)
    for i, p in enumerate(parts):
        x[i, :len(p)] = p
    m = np.array([len(p) for p in parts])
    n, width = x.shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    step = max(1, _CHUNK // (n * width))
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        units = rng.integers(0, n, size=(b, n))
        mu = m[units]
        draws = (rng.random((b, n, width)) * mu[..., None]).astype(np.int64)
        values = x[units[..., None], draws]
        keep = np.arange(width) < mu[..., None]
        out[start:start + b] = (np.where(keep, values, 0.0).sum(axis=2) / mu).mean(axis=1)
    return out


@functools.lru_cache(maxsize=256)
def small_sample_factor(n: int, level: float = CI_LEVEL) -> float:
    """Widening factor for a bootstrap interval over n blocks: √(n/(n−1)) · t_{(1+level)/2, n−1} / z_{(1+level)/2}.

    Two known small-sample defects of the percentile bootstrap of a mean of n blocks: (1) the bootstrap
    variance of the mean is (n−1)/n of the unbiased one (it divides the block variance by n, not n−1);
    (2) the sampling distribution of a mean standardised by an estimated spread is Student's t with n − 1 df,
    not normal (with n = 4 units: t = 3.18 against z = 1.96). Scaling the resampled deviations from the estimate
    by this factor makes the interval exactly the t interval on block means when the bootstrap distribution is
    normal, and keeps the bootstrap's skewness otherwise (the same correction as Hesterberg's "expanded
    percentile interval", applied to deviations so that it can reach beyond the data's range). It tends to 1
    as n grows (1.06 at n = 30).
    """
    if n < 2:
        return math.nan
    z = sps.norm.ppf((1 + level) / 2)
    return math.sqrt(n / (n - 1)) * sps.t.ppf((1 + level) / 2, n - 1) / z


def interval(parts: list[np.ndarray], level: float = CI_LEVEL, resamples: int = RESAMPLES,
             seed: int = 0) -> Interval:
    """Mean of blocked data with its hierarchical bootstrap CI (small-sample corrected percentile).

    lo, hi = θ̂ + c · (Q_{(1−level)/2}, Q_{(1+level)/2}) of (θ*_b − θ̂), θ* from `hierarchical_resamples`,
    c = `small_sample_factor(n)`. One block: lo = hi = the mean (nothing to resample).
    """
    if not parts:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = estimate(parts)
    if len(parts) == 1:
        return Interval(mean, mean, mean, 1)
    deviations = hierarchical_resamples(parts, resamples, seed) - mean
    factor = small_sample_factor(len(parts), level)
    low, high = np.quantile(deviations, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, mean + factor * float(low), mean + factor * float(high), len(parts))


def mean_ci(values, units=None, seeds=None, level: float = CI_LEVEL, resamples: int = RESAMPLES,
            seed: int = 0) -> Interval:
    """`interval` of raw values with their units and seeds (see `sample` for the defaults)."""
    return interval(blocks(sample(values, units, seeds)), level, resamples, seed)


# ---------------------------------------------------------------- paired comparison

def paired(a: pd.Series, b: pd.Series) -> pd.Series:
    """Per (unit, seed) differences a − b on the pairs both samples have."""
    common = a.index.intersection(b.index)
    return (a.loc[common] - b.loc[common]).astype(float)


def sign_flip_p(diffs, exact_up_to: int = EXACT_FLIPS_UP_TO, flips: int = RANDOM_FLIPS, seed: int = 0) -> float:
    """Two-sided paired permutation (sign-flip) test of mean(diffs) = 0 over blocks (per-unit mean differences).

    Under H0 (no difference between the methods) each unit's difference is symmetric about 0, so its sign is
    exchangeable. Statistic T = |mean(d)|; p = share of sign vectors ε ∈ {±1}^n with |mean(ε·d)| ≥ T. All 2^n
    vectors when n ≤ 16 (exact), else `flips` random ones with p = (1 + #{≥ T}) / (1 + flips).

    Why this test: it assumes no normality (a t-test on 4–8 units cannot check it), it is exact for small n,
    and unlike a sign test it uses the magnitudes of the differences. Its smallest attainable p is 2/2^n
    (the identity and the all-flip give the same |mean|): 0.125 with 4 units, 0.0625 with 5, 0.031 with 6 —
    so fewer than 6 units can never show p < 0.05. Wilcoxon's exact signed-rank null has the same floor
    (0.125 at n = 4), so no rank test does better. NaN without blocks; 1 when every difference is 0.
    """
    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    if observed == 0:
        return 1.0
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) / n >= observed - tolerance))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(flips, n))
    return float((1 + np.sum(np.abs(signs @ d) / n >= observed - tolerance)) / (1 + flips))


def min_attainable_p(n: int) -> float:
    """The smallest two-sided p a sign-flip (or exact Wilcoxon) test over n blocks can give: 2 / 2^n (1 if n ≤ 1)."""
    return min(1.0, 2.0 / 2 ** n) if n >= 1 else math.nan


def compare(a: pd.Series, b: pd.Series, level: float = CI_LEVEL, resamples: int = RESAMPLES,
            seed: int = 0) -> Comparison:
    """Paired comparison of method a with method b on the (unit, seed) pairs both have.

    d[u, s] = a[u, s] − b[u, s]; per-unit differences d̄_u = mean over the unit's seeds; Δ = mean over units of
    d̄_u; its CI is the hierarchical bootstrap `interval` of d; p is `sign_flip_p` over the d̄_u (unadjusted:
    adjust a family of them with `holm`). With one common unit the seeds are the blocks.
    """
    d = paired(a, b)
    parts = blocks(d)
    if not parts:
        return Comparison(math.nan, math.nan, math.nan, math.nan, 0, 0)
    ci = interval(parts, level, resamples, seed) if resamples else Interval(estimate(parts), math.nan, math.nan,
                                                                            len(parts))
    return Comparison(ci.mean, ci.lo, ci.hi, sign_flip_p(block_means(parts)), len(parts), len(d))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment: sort the m p-values, p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)).

    Controls the family-wise error rate (any false positive among the family) at α under any dependence
    between the tests. NaN p-values are left out of the family and stay NaN.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


# ---------------------------------------------------------------- ranks

def tied_ranks(delta: np.ndarray, p_adjusted: np.ndarray, higher_is_better: bool, alpha: float = ALPHA) -> list[str]:
    """Ranks that only separate methods a paired test separates.

    delta[i, j] is the paired Δ of method i − method j, p_adjusted[i, j] its (Holm-adjusted) p. Method i is
    *significantly better* than j when p_adjusted[i, j] < alpha and delta[i, j] points the better way. With k
    methods, rank(i) = lo–hi where lo = 1 + #{j significantly better than i} and hi = k − #{j significantly
    worse than i} (the number of methods not significantly worse than i, i included). lo ≤ hi always; the
    rank is written `lo` when lo = hi. So a method is `1` only when it is significantly better than every
    other, and methods no test separates share the whole range (`1–3`).
    """
    sign = 1.0 if higher_is_better else -1.0
    d = np.asarray(delta, dtype=float) * sign
    p = np.asarray(p_adjusted, dtype=float)
    better = (p < alpha) & (d > 0)  # better[i, j]: i significantly better than j
    k = d.shape[0]
    ranks = []
    for i in range(k):
        lo = 1 + int(better[:, i].sum())
        hi = k - int(better[i, :].sum())
        ranks.append(str(lo) if lo == hi else f"{lo}–{hi}")
    return ranks


# ---------------------------------------------------------------- critical differences (Demšar 2006)

def average_ranks(table: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Average rank of each method (columns) over blocks (rows); 1 = best; ties get the average rank."""
    scores = np.asarray(table, dtype=float) * (-1 if higher_is_better else 1)
    return sps.rankdata(scores, axis=1).mean(axis=0)


def friedman(avg_ranks: np.ndarray, n_blocks: int) -> tuple[float, float]:
    """Friedman's χ²_F = 12N / (k(k+1)) · [Σ_j R_j² − k(k+1)²/4] over N blocks and k methods with average ranks
    R_j (Demšar 2006, eq. 3), and its p-value from χ² with k − 1 df (no tie correction)."""
    r = np.asarray(avg_ranks, dtype=float)
    k = r.size
    chi2 = 12 * n_blocks / (k * (k + 1)) * (np.sum(r ** 2) - k * (k + 1) ** 2 / 4)
    return float(chi2), float(sps.chi2.sf(chi2, k - 1))


def nemenyi_cd(k: int, n_blocks: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Nemenyi critical difference CD = q_α √(k(k+1)/(6N)), q_α = the studentized range quantile
    q(1 − α; k, ∞) / √2 (Demšar 2006: 2.343 for k = 3, 2.569 for k = 4 at α = 0.05). Returns (cd, q_α)."""
    q = float(sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))
    return q * math.sqrt(k * (k + 1) / (6 * n_blocks)), q


def cliques(names: Sequence[str], avg_ranks: np.ndarray, cd: float) -> list[list[str]]:
    """Maximal runs of methods (sorted by average rank) whose ranks differ by less than cd: the bars of a CD
    diagram. Single methods are not cliques."""
    order = np.argsort(avg_ranks, kind="stable")
    r = np.asarray(avg_ranks)[order]
    found, last_end = [], -1
    for i in range(len(r)):
        j = i
        while j + 1 < len(r) and r[j + 1] - r[i] < cd:
            j += 1
        if j > i and j > last_end:
            found.append([names[t] for t in order[i:j + 1]])
            last_end = j
    return found


def critical_difference(table, names: Sequence[str], higher_is_better: bool,
                        alpha: float = ALPHA) -> CriticalDifference:
    """Friedman test and Nemenyi CD for a complete table of block means (rows: blocks, columns: methods)."""
    table = np.asarray(table, dtype=float)
    n, k = table.shape
    ranks = average_ranks(table, higher_is_better)
    chi2, p = friedman(ranks, n)
    cd, q = nemenyi_cd(k, n, alpha)
    return CriticalDifference(list(names), ranks, n, chi2, p, cd, q, cliques(list(names), ranks, cd), alpha)


def cd_figure(result: CriticalDifference, title: str = ""):
    """The critical-difference diagram (Demšar 2006, Fig. 1): a rank axis (1 = best, on the left), each method
    joined to its average rank, a bar of length CD above the axis, and thick bars under the axis joining methods
    whose average ranks differ by less than CD (not significantly different)."""
    from matplotlib.figure import Figure

    k = len(result.methods)
    order = list(np.argsort(result.avg_ranks, kind="stable"))
    left, right = order[:(k + 1) // 2], order[(k + 1) // 2:][::-1]  # the right side counts from the worst
    step, bars = 0.22, 0.1 + 0.1 * len(result.cliques)
    bottom = -(bars + step * (max(len(left), len(right)) + 0.5))
    labels = [f"{name} ({rank:.2f})" for name, rank in zip(result.methods, result.avg_ranks)]
    margin = 0.3 + 0.062 * max(len(t) for t in labels)  # inches for the labels on each side (8 pt text)
    width = 4.0 + 2 * margin
    fig = Figure(figsize=(width, 1.3 + 0.9 * (-bottom)))
    ax = fig.add_axes((margin / width, 0.02, 4.0 / width, 0.8))
    ax.set_xlim(1, k)
    ax.set_ylim(bottom, 0.55)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black", linewidth=1)
    for tick in range(1, k + 1):
        ax.vlines(tick, 0, 0.06, color="black", linewidth=1)
        ax.text(tick, 0.09, str(tick), ha="center", va="bottom", fontsize=9)
    ax.hlines(0.4, 1, 1 + result.cd, color="C3", linewidth=2, clip_on=False)
    ax.text(1 + result.cd / 2, 0.43, f"CD = {result.cd:.2f}", ha="center", va="bottom", fontsize=8, color="C3")
    for side, members in (("left", left), ("right", right)):
        for place, index in enumerate(members):
            rank = result.avg_ranks[index]
            y = -(bars + step * (place + 1))
            end = 1 if side == "left" else k
            ax.plot([rank, rank, end], [0, y, y], color="0.3", linewidth=0.8, clip_on=False)
            gap = -0.03 * k if side == "left" else 0.03 * k
            ax.text(end + gap, y, labels[index], ha="right" if side == "left" else "left",
                    va="center", fontsize=8)
    for row, group in enumerate(result.cliques):
        ranks = [result.avg_ranks[result.methods.index(name)] for name in group]
        ax.hlines(-0.08 - 0.1 * row, min(ranks) - 0.03, max(ranks) + 0.03, color="black", linewidth=3)
    fig.suptitle(title or f"Friedman χ² = {result.chi2:.2f}, p = {result.p:.3g}; N = {result.n_blocks} blocks",
                 fontsize=9, y=0.99)
    return fig


# ---------------------------------------------------------------- power and validity

def pooled_sd(per_pair_diffs: Sequence[np.ndarray]) -> tuple[float, int]:
    """Pooled sd of per-unit paired differences over method pairs: √(Σ (n_p − 1) s_p² / Σ (n_p − 1)), with the
    largest number of units n_p of any pair. Pairs with fewer than 2 units are left out; (NaN, n) if none is left."""
    usable = [np.asarray(d, dtype=float) for d in per_pair_diffs if len(d) >= 2]
    n = max((len(d) for d in per_pair_diffs), default=0)
    if not usable:
        return math.nan, n
    df = sum(d.size - 1 for d in usable)
    return math.sqrt(sum((d.size - 1) * d.var(ddof=1) for d in usable) / df), n


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> MDE:
    """Minimum detectable paired difference: MDE = (t_{1−α/2, n−1} + t_{power, n−1}) · sd / √n.

    The smallest true mean difference a two-sided paired test at level α over n units finds with the given
    power, when the per-unit differences have standard deviation sd (the usual normal-theory approximation; the
    sign-flip test is close to it for n ≥ 8). NaN with a reason when n < 2 or sd is unknown; a warning in
    `reason` when no sign-flip test over n units can reach α (2/2^n ≥ α, i.e. n ≤ 5).
    """
    if n < 2:
        return MDE(math.nan, sd, n, f"{n} unit(s): a paired difference needs at least 2 units to estimate its spread")
    if not math.isfinite(sd):
        return MDE(math.nan, sd, n, "no two methods share 2 or more units")
    value = (sps.t.ppf(1 - alpha / 2, n - 1) + sps.t.ppf(power, n - 1)) * sd / math.sqrt(n)
    reason = ""
    if min_attainable_p(n) >= alpha:
        reason = (f"no paired test over {n} units can reach p < {alpha:g} "
                  f"(smallest p = 2/2^{n} = {min_attainable_p(n):.3g}); at least 6 units are needed")
    return MDE(float(value), sd, n, reason)


def kendalls_w(ranks: np.ndarray) -> float:
    """Kendall's coefficient of concordance of m rankings (rows) of k items (columns):
    W = 12 S / (m² (k³ − k)), S = Σ_j (R_j − m(k+1)/2)², R_j the item's rank sum. 1 when every ranking agrees,
    near 0 when they are unrelated; no tie correction (ties lower W slightly)."""
    r = np.asarray(ranks, dtype=float)
    m, k = r.shape
    if k < 2 or m == 0:
        return math.nan
    s = np.sum((r.sum(axis=0) - m * (k + 1) / 2) ** 2)
    return float(12 * s / (m ** 2 * (k ** 3 - k)))


def rank_stability(samples: Sequence[pd.Series], higher_is_better: bool, resamples: int = STABILITY_RESAMPLES,
                   seed: int = 0) -> float:
    """Kendall's W of the methods' ranks across hierarchical bootstrap resamples of the sweep.

    Each resample draws units with replacement and, within each drawn unit, seeds with replacement — the same
    draws for every method, so the pairing is kept; each method's resampled mean is the mean over drawn units
    of its mean over the drawn seeds it has. The methods are ranked in each resample and W measures how much
    the rankings agree: 1 = the same order in every resample.
    """
    k = len(samples)
    if k < 2:
        return math.nan
    frame = pd.concat(list(samples), axis=1, keys=range(k))
    units = list(dict.fromkeys(frame.index.get_level_values("unit")))
    if len(units) == 1:  # one unit: seeds are the blocks
        frame.index = pd.MultiIndex.from_arrays([frame.index.get_level_values("seed"), [0] * len(frame)],
                                                names=["unit", "seed"])
        units = list(dict.fromkeys(frame.index.get_level_values("unit")))
    per_unit = [frame.xs(u, level="unit").to_numpy(dtype=float) for u in units]  # seeds × methods
    width = max(len(x) for x in per_unit)
    cube = np.full((len(units), width, k), np.nan)
    for i, x in enumerate(per_unit):
        cube[i, :len(x)] = x
    m = np.array([len(x) for x in per_unit])
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(units), size=(resamples, len(units)))
    draws = (rng.random((resamples, len(units), width)) * m[chosen][..., None]).astype(np.int64)
    values = cube[chosen[..., None], draws]                     # B × n × width × k
    values[np.arange(width)[None, None, :] >= m[chosen][..., None]] = np.nan
    with np.errstate(invalid="ignore"), _quiet():
        means = np.nanmean(np.nanmean(values, axis=2), axis=1)  # B × k
    scores = np.where(np.isnan(means), -np.inf if higher_is_better else np.inf, means)
    ranks = sps.rankdata(-scores if higher_is_better else scores, axis=1)
    return kendalls_w(ranks)


def between_within(samples: Sequence[pd.Series]) -> float:
    """Between-method variance ÷ within-method variance of a metric.

    between = variance (ddof 1) of the methods' estimates (`estimate`); within = pooled variance of every run
    around its method's mean, Σ_i Σ (y − ȳ_i)² / Σ_i (n_i − 1), i.e. unit and seed variation together. With no
    method effect the ratio is about 1/n (n runs per method); a ratio well above that means the metric moves
    more between methods than within one. NaN with fewer than 2 methods or no replicated method.
    """
    usable = [s.to_numpy(dtype=float) for s in samples if len(s)]
    if len(usable) < 2:
        return math.nan
    between = np.var([estimate(blocks(s)) for s in samples if len(s)], ddof=1)
    df = sum(x.size - 1 for x in usable)
    if df == 0:
        return math.nan
    within = sum(((x - x.mean()) ** 2).sum() for x in usable) / df
    return float(between / within) if within > 0 else (math.inf if between > 0 else math.nan)


class _quiet:
    """Silence numpy's "Mean of empty slice" warnings inside a block."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)
