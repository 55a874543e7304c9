"""What the demo model can draw, in words: the vocabulary of its captions and edit instructions,
and the one-line warning for prompt words outside it.

The demo model silently ignores words it never saw in training ("a cat", "purple"), so a user
cannot tell a prompt it cannot follow from a broken install; `vocabulary_warning` says which
words it does not know and what it does know. Real checkpoints never warn (the CLI and the nodes
ask only for the embedded demo model).

The words come from a word list beside this file (vocabulary.json), so that the CLI and the
ComfyUI nodes warn without importing the scene grammar or the training code. The list is
derived from scenes.py and phrasing.py (`derived_vocabulary`); after changing them, rewrite it
with `python -m nextstep_core.demo.vocabulary` (tests/test_vocabulary.py checks it is current).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from .. import DEMO_MODEL
from ..checks import IMAGE_MARKER

WORD_LIST = Path(__file__).with_name("vocabulary.json")
EDIT_VERBS = ("make", "move", "add", "remove")
# The words that join them in the caption and edit grammars (scenes.py).
GRAMMAR_WORDS = ("a", "an", "the", "and", "on", "in", "at", "to", "background", "that", "is", "both")
EXAMPLE = "a large red circle on the left and a small blue square at the bottom right, on a white background"


def derived_vocabulary() -> dict[str, list[str]]:
    """The word list as scenes.py and phrasing.py define it today (imports them: for rewriting
    and checking vocabulary.json, not for warning)."""
    from .phrasing import MOVE_TARGETS, PLACE_SYNONYMS, SIZE_WORDS, TELEGRAPHIC_PLACES
    from .scenes import COLORS, POSITIONS, SHAPES, SIZES

    # The synonyms of the free phrasings it was trained on (phrasing.py): "big", "in the middle", ...
    synonyms = {*(w for words in SIZE_WORDS.values() for w in words),
                *(w for table in (PLACE_SYNONYMS, TELEGRAPHIC_PLACES, MOVE_TARGETS)
                  for phrases in table.values() for p in phrases for w in p.split())}
    words = {*COLORS, *SHAPES, *SIZES, *" ".join(POSITIONS).split(), *EDIT_VERBS, *GRAMMAR_WORDS, *synonyms}
    return {"words": sorted(words), "shapes": list(SHAPES), "sizes": list(SIZES), "colors": list(COLORS),
            "positions": list(POSITIONS)}


@cache
def vocabulary() -> dict[str, list[str]]:
    """vocabulary.json: words (every known word), shapes, sizes, colors, positions (in order)."""
    return json.loads(WORD_LIST.read_text(encoding="utf-8"))


def unknown_words(prompt: str) -> list[str]:
    """The prompt's words (lower case, in order, once each) that are not in the demo vocabulary;
    capitals, punctuation and the `<image>` marker are ignored."""
    known = frozenset(vocabulary()["words"])
    words = re.findall(r"[^\W\d_]+", prompt.replace(IMAGE_MARKER, " ").lower())
    return list(dict.fromkeys(w for w in words if w not in known))


def vocabulary_warning(prompt: str) -> str | None:
    """One line naming the unknown words and the vocabulary, or None when every word is known."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    v = vocabulary()
    return (f"the demo model does not know the word(s) {', '.join(unknown)} and ignores them. It draws 1-3 "
            f"{', '.join(s + 's' for s in v['shapes'])} ({' or '.join(v['sizes'])}) in {', '.join(v['colors'])}, "
            f"placed {', '.join(v['positions'])}, on a plain or two-tone background, and edits them "
            f"({', '.join(EDIT_VERBS)}). For example: \"{EXAMPLE}\".")


def demo_model_warning(folder: str | Path | None, prompt: str) -> str | None:
    """`vocabulary_warning` when `folder` is the embedded demo model; None for any other model."""
    if folder is None or Path(folder).resolve() != DEMO_MODEL.resolve():
        return None
    return vocabulary_warning(prompt)


if __name__ == "__main__":  # rewrite the word list from the scene grammar and the phrasings
    WORD_LIST.write_text(json.dumps(derived_vocabulary(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {WORD_LIST}")
