"""Pure metric functions on logit matrices ``[positions, vocab]`` (numpy, float64 inside).

Shared by the quality evaluation (perplexity) and the adapter-survival statistics, so both read
probabilities off the same numerically stable log-softmax.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64.

    ``log p_i = x_i - max(x) - log sum_j exp(x_j - max(x))``; subtracting the row max keeps
    ``exp`` from overflowing without changing the result.
    """
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 with the row sums in float64 (same formula).

    3-4x faster than :func:`log_softmax` on this project's CPU; against it, perplexity and the
    survival statistics agree to about 1e-6 relative (tests/unit/evaluation/test_sequence.py).
    """
    x = np.asarray(logits, dtype=np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64))
    return x - lse.astype(np.float32)


def centred(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities minus their row mean: removes the per-row normalisation constant.

    The mean is taken in float64 and the result keeps ``logp``'s dtype.
    """
    return logp - logp.mean(axis=-1, keepdims=True, dtype=np.float64).astype(logp.dtype)


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """``KL(P || Q) = sum_i p_i (log p_i - log q_i)`` per row, from logits (natural log)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def target_nll(logp: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood ``-sum_t log p_t(targets[t])`` of one window.

    Args:
        logp: log-probabilities ``[positions, vocab]`` (from :func:`log_softmax`).
        targets: the next-token id of each position, ``[positions]``.
    """
    return -float(logp[np.arange(len(targets)), targets].sum(dtype=np.float64))
