"""A tiny byte-level BPE tokenizer trained in memory on :data:`rslora_deploy.testing.text.TEXT`.

Same shape as SmolLM2's (a GPT-2 style byte-level BPE in ``tokenizer.json`` plus a
``tokenizer_config.json``), so transformers' ``AutoTokenizer``, the onnxruntime-genai builder and
``onnxruntime_genai.Tokenizer`` load it as they load the real one; but it is built offline in
well under a second and its vocabulary is small enough for a tiny model's embedding.

Special tokens take ids 0-2 as in SmolLM2 (``<|endoftext|>``, ``<|im_start|>`` = BOS,
``<|im_end|>`` = EOS), matching the tiny models' ``pad/bos/eos_token_id`` = 0/1/2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rslora_deploy._fsutil import write_json

#: Vocabulary size of the tiny tokenizer: 3 special tokens, 256 byte tokens, the rest merges.
#: Tiny models that read its ids use this as ``vocab_size`` (``tiny_llama(vocab=TINY_VOCAB)``).
TINY_VOCAB = 384
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> Any:
    """Train the byte-level BPE on the built-in text; a ``tokenizers.Tokenizer``.

    The BPE trainer picks the most frequent pair at each step, ties broken by the pair itself, so
    the result depends only on the text and ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rslora_deploy.testing.text import PARAGRAPHS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p for _, p in PARAGRAPHS], trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in text yields {tok.get_vocab_size()} tokens, not {vocab_size}; "
            "choose a smaller vocab_size"
        )
    return tok


def save_tiny_tokenizer(directory: Path, vocab_size: int = TINY_VOCAB) -> Path:
    """Write the tiny tokenizer's ``tokenizer.json`` and ``tokenizer_config.json``.

    Args:
        directory: created if missing; typically a tiny model's directory.
        vocab_size: see :data:`TINY_VOCAB`.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab_size).save(str(directory / "tokenizer.json"))
    pad, bos, eos = SPECIAL_TOKENS
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "unk_token": pad,
            "model_max_length": 2048,
        },
    )
    return directory
