"""What the demo model can draw, in words: the vocabulary of its captions and edit instructions
(scenes.py's grammar), and the one-line warning for prompt words outside it.

The demo model silently ignores words it never saw in training ("a cat", "purple"), so a user
cannot tell a prompt it cannot follow from a broken install; `vocabulary_warning` says which
words it does not know and what it does know. Real checkpoints never warn (the CLI and the nodes
ask only for the embedded demo model).
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import DEMO_MODEL
from .phrasing import MOVE_TARGETS, PLACE_SYNONYMS, SIZE_WORDS, TELEGRAPHIC_PLACES
from .scenes import COLORS, POSITIONS, SHAPES, SIZES

EDIT_VERBS = ("make", "move", "add", "remove")
# The words that join them in the caption and edit grammars (scenes.py).
GRAMMAR_WORDS = ("a", "an", "the", "and", "on", "in", "at", "to", "background", "that", "is", "both")
# The synonyms of the free phrasings it was trained on (phrasing.py): "big", "in the middle", ...
SYNONYMS = tuple(sorted({*(w for words in SIZE_WORDS.values() for w in words),
                  *(w for table in (PLACE_SYNONYMS, TELEGRAPHIC_PLACES, MOVE_TARGETS)
                    for phrases in table.values() for p in phrases for w in p.split())}))
WORDS = frozenset({*COLORS, *SHAPES, *SIZES, *" ".join(POSITIONS).split(), *EDIT_VERBS, *GRAMMAR_WORDS, *SYNONYMS})
EXAMPLE = "a large red circle on the left and a small blue square at the bottom right, on a white background"
IMAGE_MARKER = "<image>"


def unknown_words(prompt: str) -> list[str]:
    """The prompt's words (lower case, in order, once each) that are not in the demo vocabulary;
    capitals, punctuation and the `<image>` marker are ignored."""
    words = re.findall(r"[^\W\d_]+", prompt.replace(IMAGE_MARKER, " ").lower())
    return list(dict.fromkeys(w for w in words if w not in WORDS))


def vocabulary_warning(prompt: str) -> str | None:
    """One line naming the unknown words and the vocabulary, or None when every word is known."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    return (f"the demo model does not know the word(s) {', '.join(unknown)} and ignores them. It draws 1-3 "
            f"{', '.join(s + 's' for s in SHAPES)} ({' or '.join(SIZES)}) in {', '.join(COLORS)}, placed "
            f"{', '.join(POSITIONS)}, on a plain or two-tone background, and edits them "
            f"({', '.join(EDIT_VERBS)}). For example: \"{EXAMPLE}\".")


def demo_model_warning(folder: str | Path | None, prompt: str) -> str | None:
    """`vocabulary_warning` when `folder` is the embedded demo model; None for any other model."""
    if folder is None or Path(folder).resolve() != DEMO_MODEL.resolve():
        return None
    return vocabulary_warning(prompt)
