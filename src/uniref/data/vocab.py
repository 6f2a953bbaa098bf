"""The fixed vocabulary of the scene grammar, for the tiny model's word-level text encoder.

Every word :mod:`uniref.data.tasks` can emit is here (tested over many seeds), lower-case, plus the
digits 1..10 of "picture N". The order is frozen: a word's position is its id in a trained checkpoint
(after the tokenizer's special tokens), so only ever append new words at the end.
"""

from __future__ import annotations

import re

# Words and numbers, the same split as the tiny model's tokenizer: "picture 10," -> ["picture", "10"].
_WORD_RE = re.compile(r"[a-z]+|\d+")

VOCABULARY: tuple[str, ...] = (
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "a",
    "add",
    "an",
    "and",
    "arrange",
    "at",
    "away",
    "background",
    "bigger",
    "blue",
    "bottom",
    "brown",
    "cells",
    "centre",
    "change",
    "checked",
    "checks",
    "circle",
    "colour",
    "corner",
    "cyan",
    "delete",
    "diagonal",
    "diamond",
    "dots",
    "dotted",
    "eighth",
    "enlarge",
    "erase",
    "fifth",
    "first",
    "fourth",
    "from",
    "front",
    "give",
    "gradient",
    "green",
    "grey",
    "grid",
    "hexagon",
    "horizontal",
    "image",
    "in",
    "later",
    "left",
    "lines",
    "make",
    "middle",
    "move",
    "navy",
    "ninth",
    "object",
    "of",
    "on",
    "onto",
    "orange",
    "over",
    "overlapping",
    "paint",
    "pattern",
    "picture",
    "pictures",
    "pink",
    "place",
    "plain",
    "plus",
    "purple",
    "put",
    "red",
    "remove",
    "replace",
    "right",
    "ring",
    "sage",
    "sand",
    "second",
    "seventh",
    "shape",
    "shrink",
    "sixth",
    "slate",
    "smaller",
    "square",
    "star",
    "striped",
    "stripes",
    "take",
    "taupe",
    "tenth",
    "the",
    "then",
    "third",
    "to",
    "top",
    "triangle",
    "turn",
    "vertical",
    "with",
    "yellow",
)


def tokenize_words(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (punctuation dropped, numbers kept as their digits)."""
    return _WORD_RE.findall(text.lower())


def unknown_words(text: str) -> list[str]:
    """Words of ``text`` outside :data:`VOCABULARY`, in order of appearance."""
    known = set(VOCABULARY)
    return [w for w in tokenize_words(text) if w not in known]
