"""Subject validation and wildcard matching, with properties over generated subjects."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from natskit.subjects import (
    SubjectMatcher,
    matches,
    validate_pattern,
    validate_subject,
)

# Tokens as NATS allows them in a publish subject: no dots, no whitespace, and (to keep
# patterns unambiguous) no '*' or '>'. Non-ASCII letters and punctuation are included.
tokens = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"),
        blacklist_characters=".*>",
    ),
    min_size=1,
    max_size=8,
)
token_lists = st.lists(tokens, min_size=1, max_size=6)
subjects = token_lists.map(".".join)


def both_match(pattern: str, subject: str) -> bool:
    """The function and the compiled matcher must always agree."""
    result = matches(pattern, subject)
    assert SubjectMatcher(pattern).matches(subject) is result
    return result


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject", ["a", "orders.eu.created", "$SRV.PING", "_INBOX.x1", "a-b_c.ü", "a*.b>"]
)
def test_validate_subject_accepts_valid(subject: str) -> None:
    assert validate_subject(subject) == subject


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("", "subject '' is empty"),
        ("a..b", "subject 'a..b' has an empty token"),
        (".a", "subject '.a' has an empty token"),
        ("a.", "subject 'a.' has an empty token"),
        ("a b", "subject 'a b' contains whitespace"),
        ("a\tb", "subject 'a\\tb' contains whitespace"),
        ("a\r\n", "subject 'a\\r\\n' contains whitespace"),
        ("a.*", "subject 'a.*': wildcard '*' is not allowed in a publish subject"),
        ("a.>", "subject 'a.>': wildcard '>' is not allowed in a publish subject"),
    ],
)
def test_validate_subject_rejects_with_reason(subject: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_subject(subject)
    assert str(info.value) == message


def test_validate_subject_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="must be a str, not bytes"):
        validate_subject(b"a.b")  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["a", "a.*", "*", ">", "a.>", "*.b.>", "a.*.c"])
def test_validate_pattern_accepts_valid(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("a*", "token 'a*' mixes a wildcard"),
        ("a.b>", "token 'b>' mixes a wildcard"),
        ("a.**", "token '**' mixes a wildcard"),
        (">.b", "pattern '>.b': wildcard '>' must be the last token"),
        ("a.>.>", "wildcard '>' must be the last token"),
        ("a..*", "pattern 'a..*' has an empty token"),
        ("a. *", "contains whitespace"),
        ("", "is empty"),
    ],
)
def test_validate_pattern_rejects_naming_pattern_and_token(
    pattern: str, fragment: str
) -> None:
    with pytest.raises(ValueError) as info:
        validate_pattern(pattern)
    assert fragment in str(info.value)
    assert repr(pattern) in str(info.value)


@given(subjects)
def test_validate_subject_accepts_generated(subject: str) -> None:
    assert validate_subject(subject) == subject
    assert validate_pattern(subject) == subject


@given(token_lists, st.data(), st.sampled_from([" ", "\t", "\r", "\n"]))
def test_validate_subject_rejects_inserted_whitespace(
    parts: list[str], data: st.DataObject, space: str
) -> None:
    subject = ".".join(parts)
    at = data.draw(st.integers(0, len(subject)))
    bad = subject[:at] + space + subject[at:]
    with pytest.raises(ValueError, match="contains whitespace"):
        validate_subject(bad)


@given(token_lists, st.data())
def test_validate_subject_rejects_inserted_empty_token(
    parts: list[str], data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(parts)))
    bad = ".".join([*parts[:at], "", *parts[at:]])
    with pytest.raises(ValueError, match="has an empty token"):
        validate_subject(bad)


# -- matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*.b.>", "x.b.y", True),
        ("*.b.>", "x.c.y", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("a.b.c", "a.b", False),
    ],
)
def test_matches_follows_nats_semantics(
    pattern: str, subject: str, expected: bool
) -> None:
    assert both_match(pattern, subject) is expected


def test_matcher_treats_regex_characters_literally() -> None:
    matcher = SubjectMatcher("a+b.(c).*")
    assert matcher.matches("a+b.(c).x")
    assert not matcher.matches("aab.c.x")
    assert not SubjectMatcher("a.b").matches("a-b")


def test_matcher_validates_and_compares_by_pattern() -> None:
    with pytest.raises(ValueError, match="must be the last token"):
        SubjectMatcher(">.a")
    assert SubjectMatcher("a.*") == SubjectMatcher("a.*")
    assert len({SubjectMatcher("a.*"), SubjectMatcher("a.*")}) == 1
    assert repr(SubjectMatcher("a.>")) == "SubjectMatcher('a.>')"


@given(token_lists, st.data())
def test_stars_in_place_of_tokens_always_match(
    parts: list[str], data: st.DataObject
) -> None:
    starred = data.draw(
        st.lists(st.booleans(), min_size=len(parts), max_size=len(parts))
    )
    pattern = ".".join(
        "*" if star else part for part, star in zip(parts, starred, strict=True)
    )
    assert both_match(pattern, ".".join(parts))


@given(token_lists, st.data())
def test_tail_replaced_by_gt_always_matches(
    parts: list[str], data: st.DataObject
) -> None:
    keep = data.draw(st.integers(0, len(parts) - 1))
    pattern = ".".join([*parts[:keep], ">"])
    assert both_match(pattern, ".".join(parts))


@given(token_lists, st.data(), tokens)
def test_different_literal_token_never_matches(
    parts: list[str], data: st.DataObject, other: str
) -> None:
    at = data.draw(st.integers(0, len(parts) - 1))
    assume(other != parts[at])
    starred = data.draw(
        st.lists(st.booleans(), min_size=len(parts), max_size=len(parts))
    )
    pattern_parts = [
        "*" if star else part for part, star in zip(parts, starred, strict=True)
    ]
    pattern_parts[at] = other
    assert not both_match(".".join(pattern_parts), ".".join(parts))


@given(token_lists)
def test_gt_never_matches_the_prefix_alone(parts: list[str]) -> None:
    subject = ".".join(parts)
    assert not both_match(subject + ".>", subject)


@given(token_lists, tokens, tokens)
def test_star_never_matches_two_tokens(
    parts: list[str], first: str, second: str
) -> None:
    prefix = ".".join(parts)
    assert not both_match(prefix + ".*", f"{prefix}.{first}.{second}")
    assert both_match(prefix + ".*", f"{prefix}.{first}")
