"""containerd's filter syntax (``pkg/filters``): parse once, match any object through an adaptor.

A filter string is a comma-separated list of *selectors*, all of which must match (AND)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." with Go escapes; for "~=" also /.../ and |...|

``~=`` takes a regular expression in Go's syntax (RE2's, as containerd's ``regexp``) and
matches when it finds a match anywhere in the value (Go's ``MatchString``). It runs on RE2
(``google-re2``), whose matching time is linear in the value and which releases the GIL:
a pattern such as ``(a+)+$`` cannot stall the process the way a backtracking engine does.
Features RE2 and Go do not have (backreferences, look-around, ``\\Z``, possessive
quantifiers) are an :class:`InvalidError` naming the pattern, as is a pattern that is not
valid UTF-8 or is too large to compile. As in Go, ``$`` matches only at the end of the value
(not before a final newline) and ``.`` does not match a newline unless ``(?s)`` is given.

A bare fieldpath tests presence. Several filter strings are OR'ed (containerd ``ParseAll``);
no string, or an empty one, matches everything. Quoting lets a label key contain dots or
slashes: ``labels."containerd.io/gc.root"``.

Matching goes through an *adaptor*, a callable that maps a fieldpath (``("labels",
"containerd.io/gc.root")``) to ``(value, present)``. Each caller writes one for its objects
(content infos, leases, cache records), which is how containerd shares one parser between
all its stores. The scanner and parser are a line-by-line port of containerd's, including its
error messages (``[before >|here|< after]: reason``), so filters behave the same in both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from ._errors import InvalidError

__all__ = [
    "Adaptor",
    "Filter",
    "map_field",
    "parse_filters",
]

#: Maps a fieldpath to ``(value, present)``; unknown fields return ``("", False)``.
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

# Scanner tokens are negative so that they never collide with a character's code point.
_EOF = -1
_QUOTED = -2
_VALUE = -3
_FIELD = -4
_SEPARATOR = -5
_OPERATOR = -6
_ILLEGAL = -7

# Go escapes inside quotes: the single-character ones, and the hex ones with their widths.
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_HEX_WIDTHS = {"x": 2, "u": 4, "U": 8}

# RE2 logs every rejected pattern to stderr unless told not to: a bad filter is the
# caller's InvalidError, not a log line.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

_PRESENT = "?"
_EQUAL = "=="
_NOT_EQUAL = "!="
_MATCHES = "~="


class Filter:
    """A parsed filter. :meth:`match` answers for one object, seen through an adaptor."""

    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        """Returns whether the object behind ``adaptor`` matches this filter."""
        raise NotImplementedError


class _Always(Filter):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "Always"


_ALWAYS = _Always()


@dataclass(frozen=True, slots=True)
class _Any(Filter):
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True, slots=True)
class _All(Filter):
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True, slots=True)
class _Selector(Filter):
    fieldpath: tuple[str, ...]
    operator: str
    value: str = ""
    regex: Any = None  # a compiled RE2 pattern (bytes), for "~="

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == _PRESENT:
            return present
        if self.operator == _EQUAL:
            return present and value == self.value
        if self.operator == _NOT_EQUAL:
            # containerd compares even an absent field (as ""), so "labels.x!=y" matches
            # objects without the label.
            return value != self.value
        if self.regex is None:  # the parser always sets it for "~="
            return False
        # Go's Regexp.MatchString finds a match anywhere in the value: search, not match.
        return self.regex.search(_utf8(value)) is not None


def parse_filters(*filters: str) -> Filter:
    """Parses containerd filter strings into one filter; several strings are OR'ed.

    Args:
        *filters: Filter strings such as ``"labels.foo==bar,digest~=^sha256:"``.

    Returns:
        A :class:`Filter`; with no strings (or an empty one) it matches everything.

    Raises:
        InvalidError: A filter is not a string, does not parse, or has a bad regular
            expression; the message names the filter and where parsing failed.
    """
    if not filters:
        return _ALWAYS
    parsed: list[Filter] = []
    for text in filters:
        if not isinstance(text, str):
            msg = f"invalid filter {text!r}: filters must be strings"
            raise InvalidError(msg)
        if text == "":
            # containerd: an empty filter matches everything, so the OR of it does too.
            parsed.append(_ALWAYS)
            continue
        parsed.append(_Parser(text).parse())
    return _Any(tuple(parsed))


def map_field(fieldpath: Sequence[str], mapping: Mapping[str, str]) -> tuple[str, bool]:
    """Looks up a map field for an adaptor (containerd ``checkMap``).

    The rest of the fieldpath after the map's name is joined with ``"."``, so the filter
    ``labels.containerd.io/gc.root`` (unquoted, where parsing allows) and
    ``labels."containerd.io/gc.root"`` name the same key.

    Args:
        fieldpath: The fieldpath without its first element (``("containerd.io", "gc")``).
        mapping: The map to look in (labels, annotations).

    Returns:
        ``(value, True)`` when the key is present, else ``("", False)``.
    """
    if not fieldpath:
        return "", False
    key = ".".join(fieldpath)
    if key in mapping:
        return mapping[key], True
    return "", False


class _ParseError(Exception):
    def __init__(self, text: str, pos: int, reason: str) -> None:
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos]}|< {text[pos + 1 :]}]"
        else:
            where = f"[{text}]"
        super().__init__(f"parse error: {where}: {reason}")


class _Scanner:
    """containerd's ``filters/scanner.go``; positions are string indexes."""

    def __init__(self, text: str) -> None:
        self.input = text
        self.pos = 0
        self.ppos = 0
        self.value = False
        self.err = ""

    def next(self) -> int:
        if self.pos >= len(self.input):
            return _EOF
        self.pos = self.ppos
        if self.ppos >= len(self.input):
            return _EOF
        ch = self.input[self.ppos]
        self.ppos += 1
        if ch == "\x00":
            self.error("unexpected null")
            return _ILLEGAL
        return ord(ch)

    def peek(self) -> int:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, int, str]:
        ch = self.next()
        pos = self.pos
        while ch >= 0:
            c = chr(ch)
            if c in '/|"':
                if not self._scan_quoted(ch):
                    return pos, _ILLEGAL, self.input[pos : self.ppos]
                return pos, _QUOTED, self.input[pos : self.ppos]
            if c in ",.":
                self.value = False
                return pos, _SEPARATOR, self.input[pos : self.ppos]
            if c in "=!~":
                self._scan_while("=!~".__contains__)
                self.value = True
                return pos, _OPERATOR, self.input[pos : self.ppos]
            if c.isspace():
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                self._scan_while(_is_value_char)
                self.value = False
                return pos, _VALUE, self.input[pos : self.ppos]
            if _is_field_char(c):
                self._scan_while(_is_field_char)
                return pos, _FIELD, self.input[pos : self.ppos]
            break
        return self.pos, ch, ""

    def _scan_while(self, accept: Callable[[str], bool]) -> None:
        while True:
            ch = self.peek()
            if ch < 0 or not accept(chr(ch)):
                return
            self.next()

    def _scan_quoted(self, quote: int) -> bool:
        illegal = False
        ch = self.next()
        while ch != quote:
            if ch < 0 or ch == ord("\n"):
                self.error("quoted literal not terminated")
                return False
            if ch == ord("\\"):
                ch, legal = self._scan_escape(quote)
                illegal = illegal or not legal
            else:
                ch = self.next()
        return not illegal

    def _scan_escape(self, quote: int) -> tuple[int, bool]:
        ch = self.next()
        if ch == quote or (ch >= 0 and chr(ch) in "abfnrtv\\"):
            return self.next(), True
        if ch >= 0 and chr(ch) in "01234567":
            return self._scan_digits(ch, 8, 3)
        if ch >= 0 and chr(ch) in _HEX_WIDTHS:
            return self._scan_digits(self.next(), 16, _HEX_WIDTHS[chr(ch)])
        self.error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: int, base: int, count: int) -> tuple[int, bool]:
        while count > 0 and _digit_value(ch) < base:
            ch = self.next()
            count -= 1
        if count > 0:
            self.error("illegal numeric escape sequence")
            return ch, False
        return ch, True

    def error(self, message: str) -> None:
        if not self.err:
            self.err = message


class _Parser:
    """containerd's ``filters/parser.go`` for one filter string."""

    def __init__(self, text: str) -> None:
        self.input = text
        self.scanner = _Scanner(text)

    def parse(self) -> Filter:
        try:
            return self._selectors()
        except _ParseError as exc:
            msg = f"invalid filter {self.input!r}: {exc}"
            raise InvalidError(msg) from None

    def _selectors(self) -> Filter:
        selectors = [self._selector()]
        while True:
            tok = self.scanner.peek()
            if tok == ord(","):
                pos, kind, _ = self.scanner.scan()
                if kind != _SEPARATOR:
                    raise self._error(pos, "expected a separator")
                selectors.append(self._selector())
            elif tok == _EOF:
                return _All(tuple(selectors))
            else:
                raise self._error(self.scanner.ppos, f"unexpected input: {_describe(tok)}")

    def _selector(self) -> Filter:
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (ord(","), _EOF):
            return _Selector(fieldpath, _PRESENT)
        operator = self._operator()
        pos, value = self._value(allow_alt_quotes=operator == _MATCHES)
        if operator != _MATCHES:
            return _Selector(fieldpath, operator, value)
        return _Selector(fieldpath, operator, value, self._compile(pos, value))

    def _compile(self, pos: int, pattern: str) -> Any:
        """Compiles a ``~=`` pattern with RE2 (Go's syntax), as UTF-8 bytes.

        containerd compiles lazily and logs; a bad pattern then never matches. Failing at
        parse time gives the caller a clear InvalidError instead of silence.
        """
        try:
            return re2.compile(_utf8(pattern), options=_RE2_OPTIONS)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "backslashreplace")
            raise self._error(pos, f"invalid regular expression {pattern!r}: {reason}") from None

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self.scanner.peek() == ord("."):
            pos, kind, _ = self.scanner.scan()
            if kind != _SEPARATOR:
                raise self._error(pos, "expected a field separator (`.`)")
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            return self._unquote(pos, text, allow_alts=False)
        if kind == _ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, "expected field or quoted")

    def _operator(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _OPERATOR:
            if text in (_EQUAL, _NOT_EQUAL, _MATCHES):
                return text
            raise self._error(pos, f"unsupported operator {text!r}")
        if kind == _ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, *, allow_alt_quotes: bool) -> tuple[int, str]:
        pos, kind, text = self.scanner.scan()
        if kind in (_VALUE, _FIELD):
            return pos, text
        if kind == _QUOTED:
            return pos, self._unquote(pos, text, allow_alts=allow_alt_quotes)
        if kind == _ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, *, allow_alts: bool) -> str:
        if not allow_alts and text[0] != '"':
            raise self._error(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except ValueError:
            raise self._error(pos, "unquoting failed: quote syntax error") from None

    def _error(self, pos: int, reason: str) -> _ParseError:
        return _ParseError(self.input, pos, reason)


def _unquote(text: str) -> str:
    """Go's ``strconv.Unquote`` for ``"``, ``/`` and ``|`` quotes (containerd ``quote.go``)."""
    quote = text[0]
    if len(text) < 2 or text[-1] != quote or quote not in '"/|':
        raise ValueError(text)
    body = text[1:-1]
    if "\n" in body:
        raise ValueError(text)
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise ValueError(text)
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError(text)
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e in _HEX_WIDTHS:
            width = _HEX_WIDTHS[e]
            digits = body[i : i + width]
            if len(digits) < width or any(_digit_value(ord(d)) >= 16 for d in digits):
                raise ValueError(text)
            i += width
            code = int(digits, 16)
            if e == "x":
                out.append(code)  # a single byte, possibly not UTF-8 (as in Go)
            elif code > 0x10FFFF:
                raise ValueError(text)
            else:
                out += chr(code).encode("utf-8", "surrogatepass")
        elif e in "01234567":
            digits = e + body[i : i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise ValueError(text)
            i += 2
            code = int(digits, 8)
            if code > 255:
                raise ValueError(text)
            out.append(code)
        elif e == quote:
            out += e.encode()
        else:
            raise ValueError(text)
    return out.decode("utf-8", "surrogateescape")


def _utf8(text: str) -> bytes:
    """``text`` as the UTF-8 bytes RE2 matches (Go strings are bytes too).

    Bytes that quoted ``\\x`` escapes produced (kept as surrogate escapes by
    :func:`_unquote`) go back to the raw bytes they stand for.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _digit_value(ch: int) -> int:
    if ch < 0:
        return 16
    c = chr(ch)
    if "0" <= c <= "9":
        return ord(c) - ord("0")
    if "a" <= c <= "f":
        return ord(c) - ord("a") + 10
    if "A" <= c <= "F":
        return ord(c) - ord("A") + 10
    return 16


def _is_field_char(c: str) -> bool:
    return c in "-_" or ("A" <= c <= "Z") or ("a" <= c <= "z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    return c != "," and not c.isspace() and c.isprintable()


def _describe(tok: int) -> str:
    if tok == _EOF:
        return "EOF"
    return chr(tok) if tok >= 0 else "illegal"
