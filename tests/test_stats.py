"""results.stats on simulated sweeps of known effect (numpy only, a few seconds) and on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from results import stats

UNITS, SEEDS = 4, 3


def simulate(rng, units, seeds, unit_sd, seed_sd, mean=0.0):
    """Blocks of a sweep: y[u, s] = mean + unit effect (sd unit_sd) + seed noise (sd seed_sd)."""
    y = mean + rng.normal(0, unit_sd, (units, 1)) + rng.normal(0, seed_sd, (units, seeds))
    return list(y)


# ---------------------------------------------------------------- hierarchical bootstrap

@pytest.mark.parametrize("unit_sd, seed_sd", [(0.0, 1.0), (3.0, 0.5)], ids=["iid", "unit-effects"])
def test_hierarchical_ci_covers_the_true_mean(unit_sd, seed_sd):
    """4 units x 3 seeds: the 95% interval covers the true mean in >= 93% of 600 simulated sweeps."""
    rng = np.random.default_rng(7)
    sweeps = 600
    hits = 0
    for i in range(sweeps):
        ci = stats.interval(simulate(rng, UNITS, SEEDS, unit_sd, seed_sd), resamples=1000, seed=i)
        hits += ci.lo <= 0.0 <= ci.hi
    assert hits / sweeps >= 0.93


def test_iid_resampling_of_runs_undercovers_with_unit_effects():
    """Why the bootstrap is hierarchical: resampling the 12 runs as i.i.d. (the old leaderboard) covers the true
    mean far less than 95% when subjects differ."""
    rng = np.random.default_rng(3)
    hits, sweeps = 0, 300
    for i in range(sweeps):
        runs = np.concatenate(simulate(rng, UNITS, SEEDS, 3.0, 0.5))
        means = runs[np.random.default_rng(i).integers(0, runs.size, (1000, runs.size))].mean(axis=1)
        lo, hi = np.quantile(means, [0.025, 0.975])
        hits += lo <= 0.0 <= hi
    assert hits / sweeps < 0.8


def test_hierarchical_resamples_draw_units_then_seeds():
    # constant within a unit: every resampled mean is a mean of 3 drawn unit values
    parts = [np.full(3, 0.0), np.full(2, 10.0), np.full(4, 20.0)]
    means = stats.hierarchical_resamples(parts, 2000, seed=1)
    assert set(np.round(means * 3).astype(int)) <= {0, 10, 20, 30, 40, 50, 60}
    assert np.allclose(means * 3, np.round(means * 3))
    # unit level only: the bootstrap variance of the mean is (n-1)/n of s^2/n
    unit_means = np.array([0.0, 1.0, 3.0, 7.0])
    means = stats.hierarchical_resamples([np.array([v]) for v in unit_means], 40_000, seed=2)
    expected = unit_means.var(ddof=1) / 4 * 3 / 4
    assert means.var() == pytest.approx(expected, rel=0.03)
    # seeds within a unit are resampled: one unit with spread gives spread
    assert stats.hierarchical_resamples([np.array([0.0, 1.0])], 500).std() > 0.2


def test_interval_point_estimate_and_small_sample_factor():
    parts = [np.array([1.0, 2.0, 3.0]), np.array([10.0])]  # unit means 2 and 10: every unit weighs the same
    assert stats.interval(parts, resamples=500).mean == pytest.approx(6.0)
    assert stats.small_sample_factor(4) == pytest.approx(math.sqrt(4 / 3) * sps.t.ppf(0.975, 3) / sps.norm.ppf(0.975))
    assert stats.small_sample_factor(30) == pytest.approx(1.061, abs=0.002)
    assert math.isnan(stats.small_sample_factor(1))
    assert stats.interval([np.array([0.4])]) == stats.Interval(0.4, 0.4, 0.4, 1)
    assert stats.interval([]).n == 0


def test_sample_and_blocks():
    s = stats.sample([1.0, 2.0, 3.0, 5.0, np.nan], units=["a", "a", "b", "b", "b"], seeds=[0, 1, 0, 0, 1])
    assert len(s) == 3 and s[("b", 0)] == 4.0  # repeated (unit, seed) averaged, NaN dropped
    assert [list(b) for b in stats.blocks(s)] == [[1.0, 2.0], [4.0]]
    one_unit = stats.sample([1.0, 2.0, 4.0], units=["ds"] * 3, seeds=[0, 1, 2])
    assert [list(b) for b in stats.blocks(one_unit)] == [[1.0], [2.0], [4.0]]  # its seeds are the blocks


# ---------------------------------------------------------------- paired test and Holm

def test_sign_flip_p_exact_cases():
    assert stats.sign_flip_p([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / 16)  # the smallest p with 4 units
    assert stats.min_attainable_p(4) == 0.125 and stats.min_attainable_p(6) == pytest.approx(0.03125)
    # d = [1, -1, 2]: |mean| of the 8 flips: 2/3 (x2: +-(1,-1,2)), 4/3 (x2), 0 (x2), 2/3 (x2) -> p(|m| >= 2/3) = 6/8
    assert stats.sign_flip_p([1.0, -1.0, 2.0]) == pytest.approx(6 / 8)
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0 and math.isnan(stats.sign_flip_p([]))
    # beyond 16 units: random flips, p = (1 + hits) / (1 + flips)
    p = stats.sign_flip_p(np.full(20, 1.0), flips=2000)
    assert p == pytest.approx(1 / 2001)


def test_holm_hand_case():
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and np.isnan(adjusted[4])


def test_compare_pairs_on_common_units_and_seeds():
    index = pd.MultiIndex.from_tuples([("a", 0), ("a", 1), ("b", 0), ("c", 0)], names=["unit", "seed"])
    a = pd.Series([1.0, 3.0, 5.0, 9.0], index=index)
    b = pd.Series([0.0, 0.0, 1.0], index=index[:3])
    c = stats.compare(a, b, resamples=500)
    # pairs (a,0) +1, (a,1) +3 -> unit a: +2; (b,0) +4 -> unit b: +4; unit c has no partner
    assert (c.delta, c.n, c.pairs) == (pytest.approx(3.0), 2, 3)
    assert c.p == 0.5 and c.lo <= 3.0 <= c.hi


def _unit_differences(rng, units, effect, unit_sd=1.0, seed_sd=1.0, seeds=SEEDS):
    """Per-unit mean paired differences of a method and the reference over `seeds` seeds: the subject's
    difficulty is shared by both and cancels; the difference has a unit part and a seed part."""
    return effect + rng.normal(0, unit_sd, units) + rng.normal(0, seed_sd, (units, seeds)).mean(axis=1)


def test_zero_effect_is_declared_in_at_most_5_percent_of_sweeps_familywise():
    """2 methods vs the reference on 2 metrics (4 comparisons), no true difference, 8 units x 3 seeds: with Holm
    across the comparisons, at most 5% of 1000 sweeps declare anything; without the adjustment far more would.
    (`compare`'s p is `sign_flip_p` of the per-unit mean differences, tested above on a frame.)"""
    rng = np.random.default_rng(11)
    adjusted_any = raw_any = 0
    sweeps = 1000
    for _ in range(sweeps):
        p = []
        for _metric in range(2):
            difficulty = rng.normal(0, 2.0, (8, 1))
            methods = [(difficulty + rng.normal(0, 1.0, (8, 1)) + rng.normal(0, 1.0, (8, SEEDS))).mean(axis=1)
                       for _ in range(3)]
            p += [stats.sign_flip_p(m - methods[0]) for m in methods[1:]]
        adjusted_any += (stats.holm(p) < 0.05).any()
        raw_any += (np.array(p) < 0.05).any()
    assert adjusted_any / sweeps <= 0.05
    assert raw_any / sweeps > 0.1  # the family needs the adjustment


def _power(rng, units, effect_sd, sweeps=400):
    unit_sd, seed_sd = 0.8, 1.0
    sd = math.sqrt(unit_sd ** 2 + seed_sd ** 2 / SEEDS)  # sd of the per-unit mean differences
    found = sum(stats.sign_flip_p(_unit_differences(rng, units, effect_sd * sd, unit_sd, seed_sd)) < 0.05
                for _ in range(sweeps))
    return found / sweeps


def test_a_real_paired_effect_is_found():
    """Power of the sign-flip test over units for a true paired effect, in SDs of the per-unit differences.

    At 8 units a 1 SD effect cannot be found in 80% of sweeps by any level-0.05 test: the t-test's exact power
    there is 0.68 (noncentral t), and the MDE formula gives 1.15 SD for 80%. So: 1 SD at 8 units within a few
    points of the t-test's 0.68; the MDE at 8 units found in about 80%; 1 SD at 12 units in >= 80%.
    """
    rng = np.random.default_rng(5)
    t_power = 1 - sps.nct.cdf(sps.t.ppf(0.975, 7), 7, math.sqrt(8))
    assert t_power == pytest.approx(0.68, abs=0.01)
    assert _power(rng, 8, 1.0) >= 0.60
    assert _power(rng, 8, stats.mde(1.0, 8).value) >= 0.72
    assert _power(rng, 12, 1.0) >= 0.80


# ---------------------------------------------------------------- ranks

def test_tied_ranks():
    # a clear winner (significantly better than both), two methods no test separates
    delta = np.array([[0, 0.5, 0.6], [-0.5, 0, 0.1], [-0.6, -0.1, 0]])
    p = np.array([[np.nan, 0.01, 0.01], [0.01, np.nan, 0.6], [0.01, 0.6, np.nan]])
    assert stats.tied_ranks(delta, p, higher_is_better=True) == ["1", "2–3", "2–3"]
    # lower is better: the same numbers turn the order around
    assert stats.tied_ranks(delta, p, higher_is_better=False) == ["3", "1–2", "1–2"]
    # nothing separated: everybody shares 1–3; never "1" for a method not significantly better than #2
    assert stats.tied_ranks(delta, np.full((3, 3), 0.2), True) == ["1–3"] * 3
    # a chain: 0 beats 2 only
    p_chain = np.array([[np.nan, 0.3, 0.01], [0.3, np.nan, 0.3], [0.01, 0.3, np.nan]])
    assert stats.tied_ranks(delta, p_chain, True) == ["1–2", "1–3", "2–3"]
    assert stats.tied_ranks(np.zeros((1, 1)), np.full((1, 1), np.nan), True) == ["1"]


# ---------------------------------------------------------------- critical differences

def test_critical_difference_against_demsar_formula(tmp_path):
    # 4 blocks x 3 methods (higher is better): A first in 3 blocks, B first in one, C always last
    table = np.array([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.7, 0.4, 0.3], [0.5, 0.6, 0.1]])
    result = stats.critical_difference(table, ["A", "B", "C"], higher_is_better=True)
    assert result.avg_ranks == pytest.approx([1.25, 1.75, 3.0])
    # chi2_F = 12N/(k(k+1)) [sum R^2 - k(k+1)^2/4] = 4 * (1.5625 + 3.0625 + 9 - 12) = 6.5; df 2: p = exp(-3.25)
    assert result.chi2 == pytest.approx(6.5) and result.p == pytest.approx(math.exp(-3.25))
    # CD = q_0.05 sqrt(k(k+1)/(6N)), q_0.05 = 2.343 for k = 3 (Demsar 2006, Table 5)
    assert result.q_alpha == pytest.approx(2.343, abs=1e-3)
    assert result.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / 24), abs=1e-3)
    assert stats.nemenyi_cd(4, 10)[1] == pytest.approx(2.569, abs=1e-3)
    assert stats.nemenyi_cd(10, 10)[1] == pytest.approx(3.164, abs=1e-3)
    # A-B 0.5 < CD, B-C 1.25 < CD, A-C 1.75 >= CD: two overlapping cliques
    assert result.cliques == [["A", "B"], ["B", "C"]]
    assert stats.cliques(["A", "B", "C"], np.array([1.0, 2.0, 3.0]), 0.5) == []
    # lower is better reverses the ranks
    assert stats.average_ranks(table, higher_is_better=False) == pytest.approx([2.75, 2.25, 1.0])
    fig = stats.cd_figure(result)
    fig.savefig(tmp_path / "cd.svg")
    assert "CD = 1.66" in (tmp_path / "cd.svg").read_text()


# ---------------------------------------------------------------- power and validity

def test_mde_against_the_formula():
    expected = (sps.t.ppf(0.975, 7) + sps.t.ppf(0.8, 7)) * 0.3 / math.sqrt(8)
    result = stats.mde(0.3, 8)
    assert result.value == pytest.approx(expected) and result.reason == ""
    assert stats.mde(1.0, 8).value == pytest.approx(1.1528, abs=1e-3)
    small = stats.mde(0.3, 4)
    assert small.value == pytest.approx((sps.t.ppf(0.975, 3) + sps.t.ppf(0.8, 3)) * 0.15)
    assert "smallest p = 2/2^4 = 0.125" in small.reason
    none = stats.mde(0.3, 1)
    assert math.isnan(none.value) and "at least 2 units" in none.reason
    assert math.isnan(stats.mde(math.nan, 5).value)


def test_pooled_sd():
    sd, n = stats.pooled_sd([np.array([1.0, 3.0]), np.array([0.0, 0.0, 3.0]), np.array([5.0])])
    # (1 * 2 + 2 * 3) / (1 + 2) = 8/3; the one-unit pair is left out of the variance, not of n
    assert sd == pytest.approx(math.sqrt(8 / 3)) and n == 3
    assert math.isnan(stats.pooled_sd([np.array([1.0])])[0])


def test_kendalls_w():
    assert stats.kendalls_w(np.array([[1, 2, 3]] * 5)) == pytest.approx(1.0)
    assert stats.kendalls_w(np.array([[1, 2, 3], [3, 2, 1]])) == pytest.approx(0.0)
    # 3 rankings of 3 items: rank sums 4, 5, 9 around m(k+1)/2 = 6: S = 4 + 1 + 9 = 14
    ranks = np.array([[1, 2, 3], [1, 2, 3], [2, 1, 3]])
    assert stats.kendalls_w(ranks) == pytest.approx(12 * 14 / (9 * 24))


def _method(values, units, seeds):
    return stats.sample(np.ravel(values), np.repeat(range(units), seeds), np.tile(range(seeds), units))


def test_rank_stability_and_between_within():
    rng = np.random.default_rng(0)
    unit = rng.normal(0, 1, (6, 1))
    clear = [_method(unit + shift + rng.normal(0, 0.05, (6, 3)), 6, 3) for shift in (0.0, 1.0, 2.0)]
    noisy = [_method(unit + rng.normal(0, 1.0, (6, 3)), 6, 3) for _ in range(3)]
    assert stats.rank_stability(clear, True, 300) > 0.95
    assert stats.rank_stability(noisy, True, 300) < 0.5
    # method means 0, 1, 2 (variance 1); within: unit spread + noise
    ratio = stats.between_within(clear)
    within = np.mean([np.var(s.to_numpy(), ddof=1) for s in clear])
    assert ratio == pytest.approx(1.0 / within, rel=0.05)
    assert stats.between_within(noisy) < ratio / 10
    assert math.isnan(stats.between_within(clear[:1]))
