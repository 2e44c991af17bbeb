"""The shipped prompt text: Shakespeare's sonnets (1609, public domain), as genai-bench uses."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def corpus_text() -> str:
    text = resources.files(__package__).joinpath("data/sonnets.txt").read_text(encoding="utf-8")
    # Ends in a newline so that repeating it for long prompts joins lines cleanly.
    return text if text.endswith("\n") else text + "\n"
