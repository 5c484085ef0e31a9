"""Checks on the words of a control command line, shared by protocol.py and deploy_protocol.py.

Client words are echoed in error messages, so they are clipped: a long one must not flood the
reply or the log. Pure: no I/O.
"""

from __future__ import annotations

from zdlb.config.table import NAME_RE
from zdlb.errors import ControlUsageError

MAX_SHOWN_CHARS = 40


def name(word: str, kind: str, usage: str) -> str:
    """``word`` if it is a valid backend or server name, else ControlUsageError(``usage``)."""
    if not word:
        raise ControlUsageError(f"empty {kind} name", usage)
    if not NAME_RE.fullmatch(word):
        message = f"invalid {kind} name {shown(word)}: use letters, digits, '.', '_', '-'"
        raise ControlUsageError(message, usage)
    return word


def expect_end(words: list[str], count: int, usage: str) -> None:
    """Refuse words after the ``count`` that make up a complete command."""
    if len(words) > count:
        done = clip(" ".join(words[:count]))
        raise ControlUsageError(f"unexpected {shown(words[count])} after '{done}'", usage)


def clip(word: str) -> str:
    if len(word) <= MAX_SHOWN_CHARS:
        return word
    return word[: MAX_SHOWN_CHARS - 3] + "..."


def shown(word: str) -> str:
    return f"'{clip(word)}'"
