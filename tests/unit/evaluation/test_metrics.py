"""Metric functions on small logit matrices: log-softmax, KL per position, target NLL."""

from __future__ import annotations

import numpy as np
import pytest

from rslora_deploy.evaluation import metrics
from tests import tolerances as tol


def _logits(seed: int, shape=(6, 11)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * 2


def test_log_softmax_is_normalised_and_stable():
    a = _logits(0)
    lp = metrics.log_softmax(a)
    assert np.allclose(np.exp(lp).sum(axis=-1), 1.0, atol=tol.F64_IDENTITY_ATOL)
    # A huge per-row offset would overflow a naive exp; the max subtraction makes it a no-op.
    assert np.allclose(metrics.log_softmax(a + 1e4), lp, atol=tol.F64_IDENTITY)


def test_kl_zero_and_positive():
    a, b = _logits(0), _logits(1)
    assert np.allclose(metrics.kl_per_position(a, a), 0, atol=tol.F64_IDENTITY_ATOL)
    assert (metrics.kl_per_position(a, b) > 0).all()
    # Adding a per-row constant to logits does not change the distribution.
    assert np.allclose(metrics.kl_per_position(a, a + 5.0), 0, atol=tol.F64_IDENTITY_ATOL)


def test_kl_matches_direct_formula():
    a, b = _logits(2, (1, 4)), _logits(3, (1, 4))
    p = np.exp(a) / np.exp(a).sum()
    q = np.exp(b) / np.exp(b).sum()
    assert metrics.kl_per_position(a, b)[0] == pytest.approx(float((p * np.log(p / q)).sum()))


def test_target_nll_picks_each_rows_target():
    a = _logits(4, (3, 5))
    targets = np.array([4, 0, 2])
    p = np.exp(a) / np.exp(a).sum(axis=-1, keepdims=True)
    expected = -sum(np.log(p[t, targets[t]]) for t in range(3))
    assert metrics.target_nll(metrics.log_softmax(a), targets) == pytest.approx(expected)
