"""Evaluate several models on the same windows with one model in memory at a time.

Each model is loaded once, runs every window of every window set it takes part in, and is
released before the next one loads; all models see the same windows in the same order. What one
model's numbers need from another model's logits (relative logit error, adapter survival) is
read back from a spill file: the float32 logits of a finished model, one raw file per window,
read a chunk of positions at a time. So memory holds one model, the current window's logits and
chunk-sized temporaries, whatever the number of models (the earlier lockstep held every model
and every model's logits of a window, plus float64 copies: 5.1 GB on the demo build, 14.2 GB on
a 0.5B Qwen2; docs/benchmarks.md). The spill costs disk: ``4 * window_len * vocab`` bytes per
spilled window (100 MB for SmolLM2's 49,152-token vocabulary at 512 positions).

Arithmetic per chunk of positions (``rows * vocab`` about 2^20 values): log-softmax
``x - max(x) - log(sum(exp(x - max(x))))`` in float32 with the row sums in float64, and every
accumulator (NLL, squared logit differences, survival sums) in float64. Against the float64
computation on real logits the results agree to about 1e-6 relative
(tests/unit/evaluation/test_sequence.py); float32 is 3-4x faster on this CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rslora_deploy.errors import RsloraDeployError
from rslora_deploy.evaluation.metrics import log_softmax32, target_nll
from rslora_deploy.evaluation.survival import SurvivalStats

logger = logging.getLogger(__name__)

LogitFn = Callable[[np.ndarray], np.ndarray]
Loader = Callable[[], LogitFn]


@dataclass
class EvalText:
    """The tokenized evaluation windows (built by :func:`.quality.eval_windows`).

    It lives here, beside its consumer, so that ``quality`` imports ``sequence`` and not the
    reverse (no import cycle).

    Attributes:
        input_ids: int64 ``[windows, window_len]``.
        scored_tokens: tokens whose prediction is scored (``windows * (window_len - 1)``).
        meta: source, split, windows, window_len, bos.
    """

    input_ids: np.ndarray
    scored_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


#: Values per chunk of positions (8 MB as float64): small enough that the temporaries stay in
#: cache-sized pieces, large enough that the per-chunk Python overhead is negligible.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class SurvivalSpec:
    """Adapter survival of ``quantized`` relative to ``base`` and ``merged`` (see survival.py).

    Attributes:
        base: name of the base model (before the adapter was merged).
        merged: name of the merged full-precision model.
        quantized: name of the quantized model whose survival is measured.
        text: the windows to measure on (None: the main windows).
        stats: the accumulated statistics (read ``stats.summary()`` after the run).
    """

    base: str
    merged: str
    quantized: str
    text: EvalText | None = None
    stats: SurvivalStats = field(default_factory=SurvivalStats)

    @property
    def names(self) -> tuple[str, str, str]:
        """``(base, merged, quantized)``."""
        return (self.base, self.merged, self.quantized)


def chunk_rows(rows: int, vocab: int) -> list[slice]:
    """Row slices of about :data:`CHUNK_ELEMENTS` values each, covering ``range(rows)``."""
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise).

    Without ``malloc_trim`` the freed weights of one model can stay in the process's RSS while
    the next one loads, which is exactly the overlap evaluating one model at a time avoids.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Spill:
    """Float32 logits of finished models on disk, one raw ``[window_len, vocab]`` file each."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, model: int, wset: int, window: int) -> Path:
        return self.root / f"m{model}-s{wset}-w{window}.f32"

    def write(self, model: int, wset: int, window: int, logits: np.ndarray) -> None:
        np.ascontiguousarray(logits, dtype=np.float32).tofile(self._path(model, wset, window))

    def rows(self, model: int, wset: int, window: int, part: slice, vocab: int) -> np.ndarray:
        """Rows ``part`` of a spilled window, read from disk (nothing else of it in memory)."""
        count = (part.stop - part.start) * vocab
        with self._path(model, wset, window).open("rb") as handle:
            handle.seek(part.start * vocab * 4)
            data = np.fromfile(handle, dtype=np.float32, count=count)
        return data.reshape(-1, vocab)


@dataclass
class _Acc:
    nll: float = 0.0
    count: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    argmax: list[np.ndarray] = field(default_factory=list)


class _Sequence:
    """The bookkeeping of one :func:`evaluate_sequence` run (see there)."""

    def __init__(
        self,
        loaders: Mapping[str, Loader],
        text: EvalText,
        pairs: Sequence[tuple[str, str]],
        survival: Sequence[SurvivalSpec],
        spill: _Spill,
    ) -> None:
        self.loaders, self.pairs, self.survival, self.spill = loaders, list(pairs), survival, spill
        self.rank = {name: k for k, name in enumerate(loaders)}
        for name in [n for pair in pairs for n in pair] + [n for s in survival for n in s.names]:
            if name not in self.rank:
                raise RsloraDeployError(f"evaluation names {name!r}, not among {list(loaders)}")
        self.sets: list[EvalText] = [text]
        self.spec_set = [
            self._set_index(spec.text if spec.text is not None else text) for spec in survival
        ]
        # A model's logits go to disk when a later model needs them on that window set.
        self.spilled = {(min(a, b, key=self.rank.__getitem__), 0) for a, b in pairs}
        for spec, wset in zip(survival, self.spec_set, strict=True):
            first, second, _ = sorted(spec.names, key=self.rank.__getitem__)
            self.spilled |= {(first, wset), (second, wset)}
        self.accs = {name: _Acc() for name in loaders}
        self.diff2 = dict.fromkeys(self.pairs, 0.0)
        self.ref2 = dict.fromkeys(self.pairs, 0.0)
        self.done: set[str] = set()

    def _set_index(self, text: EvalText) -> int:
        for index, known in enumerate(self.sets):
            if known is text:
                return index
        self.sets.append(text)
        return len(self.sets) - 1

    def sets_of(self, name: str) -> list[int]:
        """Window sets ``name`` runs on: the main windows, plus its survival specs' windows."""
        extra = {
            wset
            for spec, wset in zip(self.survival, self.spec_set, strict=True)
            if name in spec.names
        }
        return [0, *sorted(extra - {0})]

    def run_model(self, name: str) -> None:
        """Load ``name``, run its windows, spill what later models need, release it."""
        acc = self.accs[name]
        start = time.perf_counter()
        fn = self.loaders[name]()
        acc.load_seconds = time.perf_counter() - start
        for wset in self.sets_of(name):
            for window, ids in enumerate(self.sets[wset].input_ids):
                start = time.perf_counter()
                logits = np.asarray(fn(ids), dtype=np.float32)
                acc.seconds += time.perf_counter() - start
                self._window(name, wset, window, ids, logits)
                del logits
        del fn
        release_memory()
        self.done.add(name)
        logger.info(
            "evaluated %s: load %.1f s, %.1f s on windows", name, acc.load_seconds, acc.seconds
        )

    def _window(
        self, name: str, wset: int, window: int, ids: np.ndarray, logits: np.ndarray
    ) -> None:
        if wset == 0:
            self._score(name, ids, logits)
            for a, b in self.pairs:
                if name in (a, b) and (b if name == a else a) in self.done:
                    self._pair(a, b, name, window, logits)
        for spec, spec_wset in zip(self.survival, self.spec_set, strict=True):
            last = name in spec.names and self.done.issuperset(set(spec.names) - {name})
            if spec_wset == wset and last:
                self._survive(spec, wset, window, ids, name, logits)
        if (name, wset) in self.spilled:
            self.spill.write(self.rank[name], wset, window, logits)

    def _score(self, name: str, ids: np.ndarray, logits: np.ndarray) -> None:
        acc, targets = self.accs[name], ids[1:]
        for part in chunk_rows(len(ids) - 1, logits.shape[-1]):
            acc.nll += target_nll(log_softmax32(logits[part]), targets[part])
        acc.count += len(ids) - 1
        acc.argmax.append(logits[:-1].argmax(-1).astype(np.int32))

    def _pair(self, a: str, b: str, name: str, window: int, logits: np.ndarray) -> None:
        other = b if name == a else a
        vocab = logits.shape[-1]
        for part in chunk_rows(len(logits), vocab):
            theirs = self.spill.rows(self.rank[other], 0, window, part, vocab)
            la, lb = (logits[part], theirs) if name == a else (theirs, logits[part])
            self.diff2[(a, b)] += float(np.square(la - lb, dtype=np.float64).sum())
            self.ref2[(a, b)] += float(np.square(lb, dtype=np.float64).sum())

    def _survive(
        self,
        spec: SurvivalSpec,
        wset: int,
        window: int,
        ids: np.ndarray,
        name: str,
        logits: np.ndarray,
    ) -> None:
        vocab, targets = logits.shape[-1], ids[1:]
        # The last position predicts past the window: it is not scored.
        for part in chunk_rows(len(ids) - 1, vocab):
            logp = {
                other: log_softmax32(
                    logits[part]
                    if other == name
                    else self.spill.rows(self.rank[other], wset, window, part, vocab)
                )
                for other in spec.names
            }
            spec.stats.add_logprobs(
                logp[spec.base], logp[spec.merged], logp[spec.quantized], targets=targets[part]
            )

    def result(self, reference: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"models": {}}
        for name, acc in self.accs.items():
            entry: dict[str, Any] = {
                "perplexity": float(np.exp(acc.nll / acc.count)),
                "mean_nll": acc.nll / acc.count,
                "seconds": round(acc.seconds, 2),
                "load_seconds": round(acc.load_seconds, 2),
            }
            if reference is not None:
                ref = self.accs[reference].argmax
                agree = sum(int((a == r).sum()) for a, r in zip(acc.argmax, ref, strict=True))
                entry["greedy_agreement"] = agree / acc.count
            out["models"][name] = entry
        out["relative_logit_error"] = {
            f"{a}_vs_{b}": float(np.sqrt(self.diff2[(a, b)] / self.ref2[(a, b)]))
            for a, b in self.pairs
        }
        return out


def evaluate_sequence(
    loaders: Mapping[str, Loader],
    text: EvalText,
    reference: str | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    survival: Sequence[SurvivalSpec] = (),
    spill_dir: Path | None = None,
) -> dict[str, Any]:
    """Perplexity, greedy agreement, relative logit errors and survival, one model at a time.

    Args:
        loaders: name -> function that loads the model and returns its logit function
            (``ids [window_len] -> logits [window_len, vocab]``); called once each, in this
            order, and the returned function is dropped before the next model loads.
        text: the main windows (perplexity, agreement, logit errors).
        reference: the model greedy agreement is measured against (None: no agreement).
        pairs: ``(a, b)`` pairs for ``||L_a - L_b||_F / ||L_b||_F`` over all main positions.
        survival: adapter-survival measurements; each accumulates into its ``stats``.
        spill_dir: where the spill files go (a temporary folder inside it, removed at the end);
            None: the system's temporary directory.

    Returns:
        ``{"models": {name: {perplexity, mean_nll, seconds, load_seconds[, greedy_agreement]}},
        "relative_logit_error": {"a_vs_b": float}}``.

    Raises:
        RsloraDeployError: a pair, a survival spec or the reference names an unknown model.
    """
    if reference is not None and reference not in loaders:
        raise RsloraDeployError(f"reference model {reference!r} is not among {list(loaders)}")
    with tempfile.TemporaryDirectory(prefix="rslora-eval-", dir=spill_dir) as tmp:
        run = _Sequence(loaders, text, pairs, survival, _Spill(Path(tmp)))
        for name in loaders:
            run.run_model(name)
        return run.result(reference)
