"""containerd's filter syntax: the table of ``pkg/filters/filter_test.go`` plus our additions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from refcache.storage._errors import InvalidError
from refcache.storage._filters import Adaptor, map_field, parse_filters


@dataclass(frozen=True)
class Entry:
    name: str
    other: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


CORPUS = [
    Entry("foo", labels={"foo": "true"}),
    Entry("bar"),
    Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    Entry("bar", labels={"bar": "true"}),
    Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Entry("baz", other="too complex, yo"),
    Entry("bazo", other="abc"),
    Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]


def adapt(entry: Entry) -> Adaptor:
    """The adaptor of containerd's test: name, other, labels.<k>."""

    def field_of(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath[0] == "name":
            return entry.name, bool(entry.name)
        if fieldpath[0] == "other":
            return entry.other, bool(entry.other)
        if fieldpath[0] == "labels":
            return map_field(fieldpath[1:], entry.labels)
        return "", False

    return field_of


def matching(*filters: str) -> list[int]:
    matcher = parse_filters(*filters)
    return [i for i, entry in enumerate(CORPUS) if matcher.match(adapt(entry))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", list(range(9)), id="Empty"),
        pytest.param("name", list(range(9)), id="Present"),
        pytest.param("labels.foo", [0, 2, 8], id="LabelPresent"),
        pytest.param("labels.foo,name", [0, 2, 8], id="NameAndLabelPresent"),
        pytest.param("labels.foo==true", [0], id="LabelValue"),
        pytest.param("labels.foo==omg_asdf.asdf-qwer", [8], id="LabelValuePunctuated"),
        pytest.param("name==bar", [1, 3], id="Name"),
        pytest.param("name!=bar", [0, 2, 4, 5, 6, 7, 8], id="NameNotEqual"),
        pytest.param("name==bar,labels.bar", [3], id="NameAndLabelPresentTogether"),
        pytest.param('other=="too complex, yo"', [6], id="QuotedValue"),
        pytest.param("other~=[abc]+,name!=foo", [6, 7], id="RegexpValue"),
        pytest.param("other~=/[abc]+/,name!=foo", [6, 7], id="RegexpQuotedValue"),
        pytest.param("other~=/[abc]{1,2}/,name!=foo", [6, 7], id="RegexpQuotedValueBraces"),
        pytest.param('other~=/[abc]{0,1}"\\//,name!=foo', [], id="RegexpQuotedValueGarbage"),
        pytest.param("name==bar,labels.bar==true", [3], id="NameAndLabelValue"),
        pytest.param("name==bar,labels.bar==wrong", [], id="NameAndLabelValueNoMatch"),
        pytest.param('name==foo,labels."more complex label"', [2], id="LabelQuotedFieldPath"),
        pytest.param(
            'labels."more complex label with \\\\ and \\""==present',
            [4],
            id="LabelQuotedFieldPathPresentWithQuoted",
        ),
        pytest.param(
            'labels."more complex label with \\\\ and \\"".post==present',
            [5],
            id="LabelQuotedFieldPathPresentWithQuotedEmbed",
        ),
        pytest.param("name == bar", [1, 3], id="SpacesAroundOperator"),
        pytest.param("labels.foo~=^omg", [8], id="RegexpSearchesFromAnywhereButAnchors"),
        pytest.param("labels.foo~=asdf", [8], id="RegexpFindsInTheMiddle"),
        pytest.param("labels.nope!=x", list(range(9)), id="NotEqualMatchesAbsentFields"),
        pytest.param("unknown", [], id="UnknownFieldIsAbsent"),
    ],
)
def test_filter_selects_the_same_entries_as_containerd(text: str, expected: list[int]) -> None:
    assert matching(text) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(
            "labels.|foo|==omg_asdf.asdf-qwer",
            "parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
            id="LabelValueNoAltQuoting",
        ),
        pytest.param(
            'labels.?"more complex label with \\\\ and \\"".post==present',
            'parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post==present]: '
            "expected field or quoted",
            id="LabelQuotedFieldPathPresentWithQuotedEmbedInvalid",
        ),
        pytest.param(
            "name==foo,", "parse error: [name==foo,]: expected field or quoted", id="TrailingComma"
        ),
        pytest.param(
            "labels.", "parse error: [labels.]: expected field or quoted", id="TrailingSeparator"
        ),
        pytest.param(
            "image~=,id?=?fbaq",
            "parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted",
            id="MissingValue",
        ),
        pytest.param(
            "labels.ns/key==value",
            "parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
            id="FieldQuotedLiteralNotTerminated",
        ),
        pytest.param(
            "labels.key==/value",
            "parse error: [labels.key== >|/|< value]: quoted literal not terminated",
            id="ValueQuotedLiteralNotTerminated",
        ),
        pytest.param(
            "name=foo",
            "parse error: [name >|=|< foo]: unsupported operator '='",
            id="SingleEquals",
        ),
        pytest.param(
            'name=="a\\qb"',
            'parse error: [name== >|"|< a\\qb"]: illegal escape sequence',
            id="IllegalEscape",
        ),
        pytest.param(
            "name~=[",
            "parse error: [name~= >|[|< ]: invalid regular expression '['",
            id="BadRegexp",
        ),
    ],
)
def test_malformed_filter_raises_invalid_error_naming_it(text: str, error: str) -> None:
    with pytest.raises(InvalidError) as info:
        parse_filters(text)
    message = str(info.value)
    assert message.startswith(f"invalid filter {text!r}: {error}")


def test_several_filter_strings_are_ored() -> None:
    assert matching("name==bar", "labels.foo==true") == [0, 1, 3]


def test_no_filter_strings_match_everything() -> None:
    assert matching() == list(range(9))


def test_an_empty_string_among_others_matches_everything() -> None:
    assert matching("name==nothing", "") == list(range(9))


def test_one_bad_string_among_good_ones_fails_the_whole_parse() -> None:
    with pytest.raises(InvalidError, match="'name=='"):
        parse_filters("name==bar", "name==")


def test_non_string_filter_is_rejected() -> None:
    with pytest.raises(InvalidError, match="invalid filter 3"):
        parse_filters(3)  # type: ignore[arg-type]


def test_quoted_label_key_with_dots_and_slashes_names_one_label() -> None:
    labels = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath[0] == "labels":
            return map_field(fieldpath[1:], labels)
        return "", False

    assert parse_filters('labels."containerd.io/gc.root"').match(adaptor) is True
    assert parse_filters('labels."containerd.io/gc.root"==x').match(adaptor) is False
    assert parse_filters('labels."containerd.io/gc.ref"').match(adaptor) is False


def test_go_escapes_in_quoted_values_are_decoded() -> None:
    values = {"v": "a\tb\u00e9/\x41"}

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        return map_field(fieldpath, values)

    assert parse_filters('v=="a\\tb\\u00e9/\\x41"').match(adaptor) is True
    assert parse_filters('v=="a\\tb\\u00e9/\\101"').match(adaptor) is True


def test_alternative_quotes_delimit_regular_expressions_only() -> None:
    values = {"v": "x,y"}

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        return map_field(fieldpath, values)

    assert parse_filters("v~=|x,y|").match(adaptor) is True
    with pytest.raises(InvalidError, match="invalid quote encountered"):
        parse_filters("v==|x,y|")


def test_map_field_joins_the_remaining_fieldpath_with_dots() -> None:
    labels = {"a.b": "1"}
    assert map_field(("a", "b"), labels) == ("1", True)
    assert map_field(("a",), labels) == ("", False)
    assert map_field((), labels) == ("", False)


# --- regular expressions: RE2 with Go's syntax and semantics ----------------------------------

_CATASTROPHIC = r"""
import sys, time
from refcache.storage._filters import map_field, parse_filters

values = {"description": "a" * 40 + "!"}
matcher = parse_filters("description~=(a+)+$")
start = time.perf_counter()
for _ in range(1000):
    assert matcher.match(lambda fieldpath: map_field(fieldpath, values)) is False
print(f"{time.perf_counter() - start:.3f}")
"""


def test_a_catastrophic_pattern_matches_in_linear_time() -> None:
    # A backtracking engine needs ~2^40 steps for one match here (the process never returns
    # and holds the GIL meanwhile): run it in a child with a timeout, so that a regression
    # fails this test instead of hanging the suite.
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CATASTROPHIC],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("description~=(a+)+$ over a 41-character value did not finish in 60 s")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 5.0  # 1,000 matches; linear engines take milliseconds


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        pytest.param(r"(a)\1", "invalid escape sequence", id="backreference"),
        pytest.param(r"(?P<x>a)(?P=x)", "", id="named-backreference"),
        pytest.param(r"a(?=b)", "", id="lookahead"),
        pytest.param(r"(?<!a)b", "", id="lookbehind"),
        pytest.param(r"a\Z", "", id="python-end-of-string"),
        pytest.param(r"a++", "", id="possessive"),
        pytest.param(r"(?x) a", "", id="verbose-flag"),
        pytest.param(r"a{1001}", "", id="repeat-over-1000"),
        pytest.param("/\\xff/", "", id="not-utf8"),
    ],
)
def test_patterns_re2_and_go_do_not_support_are_invalid_and_named(pattern: str, why: str) -> None:
    text = f"description~={pattern}"
    with pytest.raises(InvalidError) as info:
        parse_filters(text)
    message = str(info.value)
    assert message.startswith(f"invalid filter {text!r}: parse error:")
    assert "invalid regular expression" in message
    assert why in message


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        pytest.param("a$", "a\n", False, id="dollar-is-end-of-text-only"),
        pytest.param("(?m)a$", "a\nb", True, id="multiline-flag"),
        pytest.param("a.b", "a\nb", False, id="dot-excludes-newline"),
        pytest.param("(?s)a.b", "a\nb", True, id="dotall-flag"),
        pytest.param("(?i)BUILD", "a build step", True, id="case-flag"),
        pytest.param(r"\pL+é", "café", True, id="unicode-classes"),
        pytest.param("^caf.$", "café", True, id="dot-is-one-character"),
        pytest.param(r"\Qa.b\E", "xa.by", True, id="quoted-literal"),
        pytest.param("(?P<step>RUN) ", "RUN make", True, id="named-group"),
        pytest.param("x*", "", True, id="empty-match"),
    ],
)
def test_regular_expressions_follow_go_semantics(pattern: str, value: str, matches: bool) -> None:
    values = {"v": value}

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        return map_field(fieldpath, values)

    # Unquoted when it can be: inside quotes the filter syntax's own Go escapes apply first.
    text = f"v~={pattern}" if "\\" in pattern else f"v~=|{pattern}|"
    assert parse_filters(text).match(adaptor) is matches


def test_a_quoted_byte_escape_in_a_pattern_matches_that_byte() -> None:
    # Go: "\x41" in a quoted value is the byte A; RE2 sees the same UTF-8 as Go's regexp.
    values = {"v": "xAy"}

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        return map_field(fieldpath, values)

    assert parse_filters('v~="x\\x41y"').match(adaptor) is True
