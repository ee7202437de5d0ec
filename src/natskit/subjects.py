"""NATS subjects: validation and wildcard matching.

A subject is a dot-separated list of tokens, ``orders.eu.created``. Subscriptions may
use two wildcards, each only as a whole token: ``*`` matches exactly one token, and
``>``, allowed only as the last token, matches one or more trailing tokens. So
``orders.>`` matches ``orders.eu`` and ``orders.eu.created`` but not ``orders`` itself.

Everything here is pure: strings in, strings or booleans out. Validation raises the
builtin ``ValueError``, since a bad subject is a programming error, not runtime trouble.
"""

from __future__ import annotations

import functools
import re

__all__ = [
    "NAME",
    "SubjectMatcher",
    "check_subject",
    "matches",
    "validate_pattern",
    "validate_subject",
]

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
"""Names of services, endpoints and streams: letters, digits, ``-`` and ``_``."""

# What nats-server refuses in a subject: its protocol splits lines on these.
_WHITESPACE = re.compile(r"[ \t\r\n\f]")


def validate_subject(subject: str) -> str:
    """Check a subject to publish on, and return it unchanged.

    Rejects an empty subject, whitespace, empty tokens (leading, trailing or doubled
    dots) and wildcard tokens (``*`` or ``>``), with a ``ValueError`` quoting the
    subject.
    A ``*`` or ``>`` inside a longer token (``a*``) is a literal character to NATS and
    is accepted, as nats-server accepts it.
    """
    _check_common(subject, "subject")
    for token in subject.split("."):
        if token in {"*", ">"}:
            raise ValueError(
                f"subject {subject!r}: wildcard {token!r} is not allowed in a publish "
                "subject"
            )
    return subject


def validate_pattern(pattern: str) -> str:
    """Check a subject pattern to subscribe to, and return it unchanged.

    Same rules as :func:`validate_subject`, except that ``*`` may stand as a whole
    token and ``>`` as the whole last token. A wildcard mixed into a token (``a*``) or a
    ``>`` before the end (``>.b``) raises ``ValueError`` naming the pattern and token:
    nats-server would take ``a*`` literally, which is almost never what was meant.
    """
    _check_common(pattern, "subject pattern")
    tokens = pattern.split(".")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if index != last:
                raise ValueError(
                    f"subject pattern {pattern!r}: wildcard '>' must be the last token"
                )
            continue
        if "*" in token or ">" in token:
            raise ValueError(
                f"subject pattern {pattern!r}: token {token!r} mixes a wildcard with "
                "other characters; a wildcard must be a whole token"
            )
    return pattern


def _check_common(subject: str, what: str) -> None:
    if not isinstance(subject, str):
        raise TypeError(f"{what} must be a str, not {type(subject).__name__}")
    if not subject:
        raise ValueError(f"{what} {subject!r} is empty")
    if _WHITESPACE.search(subject):
        raise ValueError(f"{what} {subject!r} contains whitespace")
    if subject[0] == "." or subject[-1] == "." or ".." in subject:
        raise ValueError(f"{what} {subject!r} has an empty token")


def matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` is delivered to a subscription on ``pattern``.

    Both are taken as valid (see :func:`validate_pattern` and :func:`validate_subject`);
    nothing is checked here, so this is cheap enough to call per message. To match many
    subjects against one pattern, :class:`SubjectMatcher` does the splitting once.
    """
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[index]:
            return False
    return len(pattern_tokens) == len(subject_tokens)


class SubjectMatcher:
    """A pattern validated and compiled once, to route many subjects.

    Used where several handlers share one subscription and each message goes to the
    handlers whose pattern it matches. A pattern without wildcards compares strings; a
    pattern with wildcards becomes one anchored regular expression, which runs in C and
    beats splitting the subject per message.
    """

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = validate_pattern(pattern)
        self._regex: re.Pattern[str] | None = None
        tokens = pattern.split(".")
        if "*" in tokens or ">" in tokens:
            parts = []
            for token in tokens:
                if token == "*":
                    parts.append(r"[^.]+")
                elif token == ">":
                    parts.append(r".+")
                else:
                    parts.append(re.escape(token))
            self._regex = re.compile(r"\.".join(parts), re.DOTALL)

    def matches(self, subject: str) -> bool:
        """Whether ``subject`` (taken as valid) matches this pattern."""
        if self._regex is None:
            return subject == self.pattern
        return self._regex.fullmatch(subject) is not None

    def __repr__(self) -> str:
        return f"SubjectMatcher({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubjectMatcher):
            return NotImplemented
        return self.pattern == other.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


check_subject = functools.lru_cache(maxsize=4096)(validate_subject)
"""``validate_subject`` remembered for the subjects seen most recently: publish paths
validate every subject, most of them again and again. A bad subject raises each time
(exceptions are not cached)."""
