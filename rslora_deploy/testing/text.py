"""A small built-in English text, and a corpus cache made from it, for tests that need real text.

The paragraphs were written for this package (no licence questions) and cover a few registers,
as the Brown corpus does, so a tokenizer trained on them sees ordinary words, numbers and
punctuation. :func:`write_tiny_corpus` lays them out exactly as ``rslora-deploy assets fetch``
lays out the Brown corpus, so code that reads the default calibration or evaluation text runs
on a machine where nothing was fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

from rslora_deploy._fsutil import write_json

#: ``(genre, paragraph)``; genres reuse Brown's names so ``--survival-genre`` style filters work.
PARAGRAPHS: tuple[tuple[str, str], ...] = (
    (
        "news",
        "The city council voted on Tuesday to repair the old bridge over the river before the "
        "winter rains. The work will cost about 4.2 million dollars and should take eight months. "
        "Several members asked why the repairs had waited so long; the mayor said the money was "
        "not there until the spring budget.",
    ),
    (
        "government",
        "Each department shall report its spending to the board at the end of every quarter. The "
        "report must list the amount, the purpose and the person who approved it. Where a payment "
        "exceeds the limit set in section 12, the board may ask for the contract and the bids.",
    ),
    (
        "learned",
        "When water is heated in a closed vessel, its pressure rises with its temperature. The "
        "measurements in Table 3 show that the rise is nearly linear between 20 and 80 degrees. "
        "Above that range the curve bends upward, which agrees with the model proposed in the "
        "earlier study.",
    ),
    (
        "fiction",
        "She walked down to the harbor when the fog was still thick on the water. A small boat "
        'was waiting at the end of the pier, its lamp swinging in the wind. "You are late," the '
        "old man said, and he did not smile. She climbed in without a word.",
    ),
    (
        "hobbies",
        "To start a garden in a small yard, choose a place that gets six hours of sun. Turn the "
        "soil with a fork, mix in some compost, and water it well. Beans, lettuce and herbs grow "
        "quickly and forgive most mistakes, so they are a good first choice.",
    ),
    (
        "news",
        "Heavy snow closed the northern highway for most of the day, and hundreds of drivers "
        "spent the night in schools and churches along the road. Crews cleared one lane by "
        "morning. Officials expect the road to open fully on Friday if the weather holds.",
    ),
    (
        "reviews",
        "The new play at the Grand Theater is long, uneven and often brilliant. The first act "
        "drags, but the second act moves with real energy, and the young actor in the lead role "
        "holds the stage with ease. It is worth seeing, though not for the music.",
    ),
    (
        "learned",
        "A simple model of a population assumes that its growth rate is proportional to its "
        "size. The solution is an exponential curve, which fits the early data well. Later, "
        "limits on food and space slow the growth, and a logistic curve describes it better.",
    ),
    (
        "fiction",
        "The house had been empty for years. Dust lay on the piano, and the clock in the hall "
        "had stopped at a quarter past three. He opened the window, and the cold air moved the "
        "curtains like a slow breath. Somewhere upstairs a door closed.",
    ),
    (
        "religion",
        "Many traditions teach that patience is learned slowly, through small trials rather than "
        "great ones. The lesson is repeated in stories of travelers, farmers and kings, each of "
        "whom must wait for something that cannot be hurried.",
    ),
    (
        "hobbies",
        "A good photograph often depends more on light than on the camera. Early morning and "
        "late afternoon give soft shadows and warm colors. Keep the horizon level, move closer "
        "than you think you should, and take more pictures than you need.",
    ),
    (
        "government",
        "The committee recommends that the program continue for two more years, with a review "
        "after the first. It further recommends that the office publish its results each year, "
        "so that the public may judge whether the program meets its goals.",
    ),
)

#: Every paragraph, in order, as one training text (blank lines between paragraphs).
TEXT = "\n\n".join(p for _, p in PARAGRAPHS)


def write_tiny_corpus(root: Path, copies: int = 4) -> Path:
    """Write the paragraphs as a Brown-style split cache under ``root/corpora/brown``.

    Point ``RSLORA_DEPLOY_CACHE`` at ``root`` and
    :func:`rslora_deploy.data.corpus.iter_documents` reads this instead of the fetched corpus.
    Documents are the paragraphs ``copies`` times over (so a few hundred tokens of calibration and
    evaluation text exist), split by the corpus's own rule (every fifth document per genre goes
    to ``evaluation``).

    Args:
        root: the cache root (``RSLORA_DEPLOY_CACHE``).
        copies: how many times each paragraph appears.

    Returns:
        The corpus directory.
    """
    from rslora_deploy.data.assets import MARKER
    from rslora_deploy.data.corpus import SPLITS, split_of

    target = Path(root) / "corpora" / "brown"
    target.mkdir(parents=True, exist_ok=True)
    by_genre: dict[str, list[str]] = {}
    for _ in range(copies):
        for genre, text in PARAGRAPHS:
            by_genre.setdefault(genre, []).append(text)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for genre, texts in sorted(by_genre.items()):
        for index, text in enumerate(texts):
            doc = {"id": f"t{genre[:2]}{index:02d}", "genre": genre, "text": text}
            lines[split_of(index)].append(json.dumps(doc))
    for split, docs in lines.items():
        (target / f"{split}.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    write_json(target / MARKER, {"source": {"testing": "rslora_deploy.testing.text"}})
    return target
