"""nnsight_pure.statistics against hand formulas, and its invariants as properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnsight_pure import statistics as stats

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=64)
samples = st.lists(finite, min_size=2, max_size=40)


def test_mean_and_stderr_match_hand_formulas() -> None:
    xs = [1.0, 2.0, 4.0, 7.0]
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    values = torch.tensor(xs, dtype=torch.float64)
    assert float(stats.mean(values)) == pytest.approx(3.5)
    assert float(stats.stderr(values)) == pytest.approx(sd / math.sqrt(n))


def test_cells_are_independent_columns() -> None:
    values = torch.randn(30, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert stats.stderr(values).shape == (3, 4)
    for i in range(3):
        for j in range(4):
            column = values[:, i, j]
            assert float(stats.stderr(values)[i, j]) == pytest.approx(float(column.std() / math.sqrt(30)))


def test_bootstrap_matches_a_resampling_loop_by_hand() -> None:
    values = torch.randn(25, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # The same draws as stats.bootstrap_means makes, then plain gathering.
    generator = torch.Generator().manual_seed(7)
    draws = torch.randint(0, 25, (500, 25), generator=generator)
    means = torch.stack([values[row].mean(dim=0) for row in draws])
    torch.testing.assert_close(stats.bootstrap_means(values, n_resamples=500, seed=7), means)
    low, high = stats.bootstrap_ci(values, n_resamples=500, confidence=0.9, seed=7)
    torch.testing.assert_close(low, torch.quantile(means, 0.05, dim=0))
    torch.testing.assert_close(high, torch.quantile(means, 0.95, dim=0))


def test_permutation_pvalue_matches_sign_flips_by_hand() -> None:
    values = torch.tensor([0.5, 1.5, -0.2, 0.9, 1.1, 0.3], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    signs = torch.randint(0, 2, (400, 6), generator=generator).to(torch.float64) * 2 - 1
    observed = abs(float(values.mean()))
    reached = sum(abs(float((row * values).mean())) >= observed - 1e-12 for row in signs)
    expected = (1 + reached) / 401
    assert float(stats.permutation_pvalue(values, n_resamples=400, seed=3)) == pytest.approx(expected)


def test_a_strong_effect_is_significant_and_zero_effect_is_not() -> None:
    strong = torch.full((20,), 2.0) + 0.1 * torch.randn(20, generator=torch.Generator().manual_seed(4))
    assert float(stats.permutation_pvalue(strong, n_resamples=999)) < 0.01
    balanced = torch.tensor([1.0, -1.0] * 10)
    assert float(stats.permutation_pvalue(balanced, n_resamples=999)) == 1.0


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        stats.stderr(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci(torch.randn(5), confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        stats.bootstrap_ci(torch.randn(5), n_resamples=0)
    with pytest.raises(TypeError, match="tensor"):
        stats.mean([1.0, 2.0])  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(samples, st.integers(min_value=0, max_value=2**31))
def test_bootstrap_is_deterministic_under_a_seed(xs: list[float], seed: int) -> None:
    values = torch.tensor(xs, dtype=torch.float64)
    first = stats.bootstrap_ci(values, n_resamples=200, seed=seed)
    second = stats.bootstrap_ci(values, n_resamples=200, seed=seed)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@settings(max_examples=60, deadline=None)
@given(samples)
def test_interval_is_ordered_and_inside_the_data(xs: list[float]) -> None:
    values = torch.tensor(xs, dtype=torch.float64)
    low, high = stats.bootstrap_ci(values, n_resamples=200)
    slack = 1e-9 * (1 + max(abs(x) for x in xs))
    assert float(low) <= float(high) + slack
    assert min(xs) - slack <= float(low) and float(high) <= max(xs) + slack


@settings(max_examples=60, deadline=None)
@given(samples)
def test_interval_of_symmetric_data_contains_the_mean(xs: list[float]) -> None:
    # Data mirrored about its mean: resample means fall on either side equally often.
    centre = sum(xs) / len(xs)
    values = torch.tensor(xs + [2 * centre - x for x in xs], dtype=torch.float64)
    low, high = stats.bootstrap_ci(values, n_resamples=1000, confidence=0.9)
    mean = float(stats.mean(values))
    slack = 1e-9 * (1 + max(abs(x) for x in values.tolist()))
    assert float(low) - slack <= mean <= float(high) + slack


@settings(max_examples=40, deadline=None)
@given(samples, st.integers(min_value=2, max_value=6))
def test_stderr_scales_as_one_over_sqrt_n(xs: list[float], copies: int) -> None:
    # Repeating the sample k times keeps its spread (up to ddof) and divides SE by ~sqrt(k).
    values = torch.tensor(xs, dtype=torch.float64)
    repeated = values.repeat(copies)
    n = len(xs)
    ratio = math.sqrt((n - 1) / (copies * n - 1))  # the ddof=1 variance changes by (n-1)/(kn-1) * k
    expected = float(stats.stderr(values)) * ratio
    assert float(stats.stderr(repeated)) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=12), st.lists(st.integers(min_value=1, max_value=4), max_size=2))
def test_shapes_follow_the_cells(n: int, cells: list[int]) -> None:
    values = torch.randn(n, *cells, generator=torch.Generator().manual_seed(n))
    assert stats.mean(values).shape == tuple(cells)
    low, high = stats.bootstrap_ci(values, n_resamples=50)
    assert low.shape == high.shape == tuple(cells)
    assert stats.permutation_pvalue(values, n_resamples=50).shape == tuple(cells)
    assert stats.bootstrap_means(values, n_resamples=50).shape == (50, *cells)
