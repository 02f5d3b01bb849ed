"""One normalized view of a Hugging Face ``config.json``, used by budget, export and reports.

Config key names differ by architecture (``n_layer`` for GPT-2, ``num_hidden_layers`` for Llama);
the view resolves them once and raises a precise error naming the missing key, instead of every
stage guessing on its own (optimum's ``NormalizedTextConfig`` idea).
"""

from __future__ import annotations

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
# A real config.json is a few KB; a multi-megabyte one is not a config.
_MAX_CONFIG_BYTES = 1 << 20


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
    context_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


#: Upper bounds far above any real model (Llama-3-405B: 126 layers, hidden 16384, vocab 128256).
#: A config beyond them is corrupt or hostile; building even a meta model from it could hang.
_LIMITS = {
    "hidden": 1 << 17,
    "layers": 4096,
    "heads": 4096,
    "vocab": 1 << 23,
    "intermediate": 1 << 20,
}


def _positive_int(value: Any, key: str, limit: int, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise InputError(
            f"{path}/config.json: {key}={value!r} is not an integer in 1..{limit}; the config is "
            "corrupted or not a causal LM config, re-export the model"
        )
    return value


def _find(config: dict[str, Any], field: str, path: Path) -> int:
    for key in _KEYS[field]:
        if config.get(key) is not None:
            return _positive_int(config[key], key, _LIMITS[field], path)
    raise UnsupportedError(
        f"{path}: config.json has none of {', '.join(_KEYS[field])} (needed for {field}); "
        "is this a decoder-only causal LM?"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    """Parse ``model_dir/config.json`` (size-capped, must be a JSON object).

    Raises:
        InputError: missing, too large, invalid JSON, or not an object.
    """
    from rslora_deploy.untrusted import read_json

    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise InputError(
            f"{model_dir} has no config.json; pass a Hugging Face model directory or a .gguf file"
        )
    return read_json(path, "model config", max_bytes=_MAX_CONFIG_BYTES, fix="re-export the model")


def model_view(model_dir: Path) -> ModelView:
    """Normalized hyper-parameters of the model in ``model_dir``."""
    config = read_config(model_dir)
    hidden = _find(config, "hidden", model_dir)
    heads = _find(config, "heads", model_dir)
    kv_heads = _positive_int(
        config.get("num_key_value_heads") or heads, "num_key_value_heads", heads, model_dir
    )
    if heads % kv_heads:
        raise InputError(
            f"{model_dir}/config.json: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}; the config is corrupted, re-export the model"
        )
    head_dim = _positive_int(
        config.get("head_dim") or hidden // heads, "head_dim", _LIMITS["hidden"], model_dir
    )
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
        context_length=_context_length(config),
    )


def _context_length(config: dict[str, Any]) -> int | None:
    """The longest context the model was trained for (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "context_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def view_from_genai(onnx_dir: Path) -> ModelView:
    """The view of an onnxruntime-genai folder without ``config.json`` (its genai_config.json).

    genai_config has no intermediate size: it is read from the graph's first MLP up projection
    (``MatMulNBits`` attribute ``N``), else 4 * hidden stands in.

    Raises:
        InputError: an unreadable genai_config.json, or one missing a size.
    """
    from rslora_deploy.untrusted import read_json

    path = Path(onnx_dir) / "genai_config.json"
    data = read_json(path, "genai config", fix="re-export the model")
    try:
        cfg, dec = data["model"], data["model"]["decoder"]
        sizes = {
            key: _positive_int(source[key], key, 1 << 24, path.parent)
            for source, key in (
                (dec, "hidden_size"), (dec, "num_hidden_layers"), (dec, "num_attention_heads"),
                (dec, "num_key_value_heads"), (dec, "head_size"), (cfg, "vocab_size"),
            )
        }  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path} lacks {exc}; re-export the model") from None
    hidden = sizes["hidden_size"]
    return ModelView(
        architecture=str(cfg.get("type")), model_type=str(cfg.get("type")), hidden=hidden,
        layers=sizes["num_hidden_layers"], heads=sizes["num_attention_heads"],
        kv_heads=sizes["num_key_value_heads"], head_dim=sizes["head_size"],
        vocab=sizes["vocab_size"], intermediate=_graph_intermediate(onnx_dir) or 4 * hidden,
        tie_word_embeddings=False, quantization=None, context_length=_context_length(cfg),
    )  # fmt: skip


def _graph_intermediate(onnx_dir: Path) -> int | None:
    """The MLP width from the exported graph: ``N`` of layer 0's up projection."""
    path = Path(onnx_dir) / "model.onnx"
    if not path.is_file():
        return None
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - an unreadable graph only loses this refinement
        return None
    for node in graph.node:
        if node.name.startswith("/model/layers.0/mlp/") and "up_proj" in node.name:
            for attr in node.attribute:
                if attr.name == "N":
                    return int(attr.i)
    return None


def decoder_linear_params(view: ModelView) -> int:
    """Weights of the quantized decoder projections (Llama family: q, k, v, o, gate, up, down)."""
    attn = view.hidden * view.head_dim * (2 * view.heads + 2 * view.kv_heads)
    mlp = 3 * view.hidden * view.intermediate
    return view.layers * (attn + mlp)
