"""Statistics over examples: mean, standard error, bootstrap interval, paired test.

Pure functions of a tensor whose dim 0 runs over examples (a patching sweep's
per-example effects, say): each returns one value per remaining cell. They
use torch only, and the random ones draw from a `torch.Generator` seeded
with ``seed``, so the same call gives the same answer on every machine.
"""

from __future__ import annotations

import math

import torch


def _examples(values: torch.Tensor, least: int) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"expected a tensor of per-example values, got {type(values).__name__}")
    if values.dim() == 0 or values.shape[0] < least:
        shape = tuple(values.shape)
        raise ValueError(f"needs at least {least} example(s) along dim 0, got a tensor of shape {shape}")
    return values if values.is_floating_point() else values.double()


def mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over examples (dim 0)."""
    return _examples(values, 1).mean(dim=0)


def stderr(values: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean over examples: the sample standard
    deviation (``ddof=1``) over ``sqrt(n)``. Needs two examples."""
    values = _examples(values, 2)
    return values.std(dim=0, correction=1) / math.sqrt(values.shape[0])


def _check_resamples(n_resamples: int) -> None:
    if type(n_resamples) is not int or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer of at least 1, got {n_resamples!r}")


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def bootstrap_means(values: torch.Tensor, *, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """The means of ``n_resamples`` resamples of the examples, drawn with
    replacement (the same draw for every cell): ``[n_resamples, *cells]``.

    Each resample is counted rather than gathered (how often each example was
    drawn, times the values), so memory grows with resamples plus cells, not
    their product.
    """
    values = _examples(values, 1)
    _check_resamples(n_resamples)
    n = values.shape[0]
    draws = torch.randint(0, n, (n_resamples, n), generator=_generator(seed))
    counts = torch.zeros(n_resamples, n, dtype=values.dtype).scatter_add_(
        1, draws, torch.ones(n_resamples, n, dtype=values.dtype)
    )
    flat = values.reshape(n, -1).to("cpu")
    return (counts @ flat / n).reshape(n_resamples, *values.shape[1:])


def bootstrap_ci(
    values: torch.Tensor, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The percentile bootstrap confidence interval of the mean over examples:
    ``(low, high)``, the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles (linear interpolation) of `bootstrap_means`."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    means = bootstrap_means(values, n_resamples=n_resamples, seed=seed)
    alpha = (1.0 - confidence) / 2.0
    bounds = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=means.dtype), dim=0)
    return bounds[0], bounds[1]


def permutation_pvalue(values: torch.Tensor, *, n_resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """Two-sided p-value of a paired sign-flip permutation test that the mean
    over examples is zero (``values``: per-example differences, such as a
    patched run's metric minus the corrupted run's).

    Under the null each difference is as likely to have either sign: each
    resample flips the signs at random, and the p-value is
    ``(1 + #{|mean of flipped| >= |mean|}) / (1 + n_resamples)``, never zero.
    """
    values = _examples(values, 1)
    _check_resamples(n_resamples)
    n = values.shape[0]
    signs = torch.randint(0, 2, (n_resamples, n), generator=_generator(seed)).to(values.dtype) * 2 - 1
    flat = values.reshape(n, -1).to("cpu")
    observed = (flat.sum(dim=0) / n).abs()
    flipped = (signs @ flat / n).abs()
    # A flipped mean equal to the observed one up to rounding counts as reaching it
    # (flipping every sign, or none, gives the observed mean again).
    rounding = 4 * n * torch.finfo(flat.dtype).eps * flat.abs().mean(dim=0)
    reached = flipped >= observed - rounding
    return ((1 + reached.sum(dim=0)).to(values.dtype) / (1 + n_resamples)).reshape(values.shape[1:])
