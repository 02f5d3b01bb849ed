"""One normalized view of a Hugging Face ``config.json``, used by budget, export and reports.

Config key names differ by architecture (``n_layer`` for GPT-2, ``num_hidden_layers`` for Llama);
the view resolves them once and raises a precise error naming the missing key, instead of every
stage guessing on its own (optimum's ``NormalizedTextConfig`` idea).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rslora_deploy.errors import InputError, UnsupportedError

_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
}


@dataclass(frozen=True)
class ModelView:
    """Architecture hyper-parameters the pipeline needs."""

    architecture: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tie_word_embeddings: bool
    quantization: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _find(config: dict[str, Any], field: str, path: Path) -> int:
    for key in _KEYS[field]:
        if config.get(key) is not None:
            return int(config[key])
    raise UnsupportedError(
        f"{path}: config.json has none of {', '.join(_KEYS[field])} (needed for {field}); "
        "is this a decoder-only causal LM?"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    """Parse ``model_dir/config.json``.

    Raises:
        InputError: missing file or invalid JSON.
    """
    path = Path(model_dir) / "config.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{model_dir} has no config.json; pass a Hugging Face model directory or a .gguf file"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); re-export the model") from None
    return data


def model_view(model_dir: Path) -> ModelView:
    """Normalized hyper-parameters of the model in ``model_dir``."""
    config = read_config(model_dir)
    hidden = _find(config, "hidden", model_dir)
    heads = _find(config, "heads", model_dir)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    try:
        intermediate = _find(config, "intermediate", model_dir)
    except UnsupportedError:
        intermediate = 4 * hidden  # GPT-2 style configs leave n_inner null meaning 4*hidden
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelView(
        architecture=str(archs[0]),
        model_type=str(config.get("model_type", "unknown")),
        hidden=hidden,
        layers=_find(config, "layers", model_dir),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=_find(config, "vocab", model_dir),
        intermediate=intermediate,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        quantization=config.get("quantization_config"),
    )
