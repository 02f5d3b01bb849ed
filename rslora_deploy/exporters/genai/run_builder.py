"""Child-process entry that runs the onnxruntime-genai 0.18 builder on a config view it can read.

``python -m rslora_deploy.exporters.genai.run_builder <builder arguments>`` is the builder's own
``__main__`` with one difference: the Hugging Face config it loads goes through
:func:`builder_config_view` first.

Why: transformers 5 stores Gemma-3's two RoPE bases per layer type, ``rope_parameters =
{"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_theta": 1e6}}``, and drops
the flat fields ``rope_theta`` / ``rope_local_base_freq`` that the builder 0.18 reads. The builder
then fails (``'Gemma3TextConfig' object has no attribute 'rope_local_base_freq'``), and, worse,
once that attribute exists it would build the global layers' cos/sin tables with its fallback base
10000 instead of 1e6 (``rope_theta`` missing too) and read ``rope_parameters["rope_type"]``, which
the nested form lacks. A ``config.json`` on disk cannot carry the flat fields (transformers 5
folds them back into ``rope_parameters`` on load), so the view is applied to the loaded object,
only inside this child process. The weights are read from the checkpoint files as before.
"""

from __future__ import annotations

import sys
from typing import Any

from rslora_deploy.errors import UnsupportedError

#: Layer types of the nested RoPE form and the flat fields the builder reads for each.
_NESTED_ROPE = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}


def builder_config_view(config: Any) -> Any:
    """Give a transformers-5 config the flat RoPE fields the 0.18 builder reads (in place).

    Configs without the per-layer-type ``rope_parameters`` are returned unchanged.

    Raises:
        UnsupportedError: a layer type uses a RoPE scaling the flat form cannot express.
    """
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not set(_NESTED_ROPE) <= set(rope):
        return config
    for layer_type, field in _NESTED_ROPE.items():
        params = rope[layer_type]
        if params.get("rope_type", "default") != "default":
            raise UnsupportedError(
                f"{getattr(config, 'model_type', 'model')} uses rope_type="
                f"{params['rope_type']!r} on its {layer_type} layers; the onnxruntime-genai 0.18 "
                "export supports default RoPE there only"
            )
        setattr(config, field, float(params["rope_theta"]))
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    return config


class _ConfigLoader:
    """Stands in for ``transformers.AutoConfig`` inside the builder module."""

    def __init__(self, auto_config: Any) -> None:
        self._auto = auto_config

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """Load as AutoConfig does, then apply :func:`builder_config_view`."""
        return builder_config_view(self._auto.from_pretrained(*args, **kwargs))


def main() -> None:
    """The builder's ``__main__`` (0.18.0), with the config view in place."""
    from onnxruntime_genai.models import builder

    builder.AutoConfig = _ConfigLoader(builder.AutoConfig)
    args = builder.get_args()
    extra_options = builder.parse_extra_options(
        args.model_name, args.input, args.output, args.precision, args.execution_provider,
        args.cache_dir, args.extra_options,
        builder_config_version=args.builder_config_version, target_options=args.target_options,
        drafter_options=args.drafter_options, speculative_options=args.speculative_options,
        runtime_config=args.runtime_config, search=args.search,
    )  # fmt: skip
    builder.create_model(
        args.model_name, args.input, args.output, args.precision, args.execution_provider,
        args.cache_dir, **extra_options,
    )  # fmt: skip


if __name__ == "__main__":
    main()
    sys.exit(0)
