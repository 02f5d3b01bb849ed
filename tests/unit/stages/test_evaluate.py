"""Stage ``evaluate``: what goes into the hashed quality.json."""

from __future__ import annotations

from rslora_deploy.stages.evaluate import without_wall_times


def test_quality_json_carries_no_wall_times() -> None:
    """Two cold demo builds wrote quality.json differing only in these fields (bench_cache.py)."""
    quality = {
        "seconds": 110.2,
        "protocol": {"windows": 8},
        "models": {
            "merged": {"perplexity": 29.5, "seconds": 32.16, "load_seconds": 0.19},
            "onnx": {"perplexity": 34.3, "greedy_agreement": 0.77, "seconds": 24.5},
        },
        "relative_logit_error": {"onnx_vs_merged": 0.17},
    }
    kept = without_wall_times(quality)
    assert kept == {
        "protocol": {"windows": 8},
        "models": {
            "merged": {"perplexity": 29.5},
            "onnx": {"perplexity": 34.3, "greedy_agreement": 0.77},
        },
        "relative_logit_error": {"onnx_vs_merged": 0.17},
    }
    assert quality["models"]["merged"]["seconds"] == 32.16  # the input is not modified
