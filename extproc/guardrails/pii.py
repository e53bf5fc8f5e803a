"""PII and secret detectors: linear-time regular expressions, then a validity check.

Each detector is one or more candidate patterns plus a check that rejects near misses:
the Luhn sum and issuer prefixes of card numbers, the country length and mod-97 checksum
of IBANs (`python-stdnum`), the C library's parser for IPv6 (`inet_pton`: on what the
pattern lets through it accepts what `ipaddress` does, at a twentieth of the cost;
tests/unit/test_guardrails_pii.py holds the two to each other), octet ranges for IPv4,
the reserved ranges of SSNs, digit counts of phone numbers.

Speed (bench/guardrails.py): Python's regex engine scans a character class at roughly
7 ns a character (3.5 ns for a set of two or three characters), but jumps to a literal
prefix at memchr speed. So number-like detectors run on the text's *shape* (one
`translate`: every ASCII digit becomes `0`, upper-case letter `A`, lower-case `a`, the
rest stays), where each pattern starts with a literal; emails start at `@`, secrets at
`sk-`, `AKIA`/`ASIA` and `-----BEGIN`, IPv6 at a `:` between hex digits. Look-behinds
come after that literal, so the scan never enters the matcher elsewhere. One pre-filter
scan with an alternation of all those anchors would lose the literal jump and cost more
than the scans it replaces (measured: 14 µs on 4 KB against 1.5 µs a literal scan).
Card numbers, SSNs, IPv4 addresses and phone numbers share one search from number start
to number start (`_Plan.either`): Python only sees the starts where a pattern matched.
What a set of detectors needs is worked out once (`_plan`), not on every call.

Every pattern is free of nested unbounded quantifiers over overlapping classes: the cost
is linear in the text (tests/unit/test_guardrails_pii.py feeds adversarial inputs). Not
found on purpose (docs/guardrails.md): SSNs and phone numbers written without
separators, lower-case IBANs, non-ASCII digits, names and street addresses.
"""

from __future__ import annotations

import bisect
import functools
import re
import socket
import string
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from stdnum import numdb

__all__ = ["Found", "find", "luhn_valid"]


class Found(NamedTuple):
    """A match (a tuple: cheaper to build than a frozen dataclass, one per match)."""

    detector: str
    start: int
    end: int


_SHAPE_FROM: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
_SHAPE_TO: Final = "0" * 10 + "A" * 26 + "a" * 26
_SHAPE_BYTES: Final = bytes.maketrans(_SHAPE_FROM.encode(), _SHAPE_TO.encode())
_SHAPE_STR: Final = str.maketrans(_SHAPE_FROM, _SHAPE_TO)


def shape(text: str) -> str:
    """`text` with digits as `0`, ASCII letters as `A`/`a`: same length, same offsets."""
    if text.isascii():
        return text.encode().translate(_SHAPE_BYTES).decode()
    return text.translate(_SHAPE_STR)


# --- patterns over the shape (W = a word character of the shape) -------------------------
_W: Final = "A0a_"
_CARD: Final = re.compile(rf"0(?<![{_W}.-]0)(?:[ -]?0){{12,18}}(?![{_W}-]|\.0)")
_SSN: Final = re.compile(rf"000-00-0000(?<![{_W}-]000-00-0000)(?![{_W}-])")
_IBAN: Final = re.compile(
    rf"AA00(?<![{_W}]AA00)(?: ?[A0]{{4}}){{2,7}}(?: ?[A0]{{1,3}})?(?![{_W}])")
_IPV4: Final = re.compile(rf"0(?<![{_W}.]0)0{{0,2}}(?:\.0{{1,3}}){{3}}(?![{_W}]|\.0)")
# The two phone patterns that open with `+` or `(`, from their first digit on: the number
# start search (`_Plan.either`) finds them at that digit.
_PHONE_INTERNATIONAL_TAIL: Final = (
    rf"(?<=\+0)(?<![{_W}+.-]\+0)0{{0,2}}(?:[ .-]?\(?0{{1,4}}\)?){{2,5}}(?![{_W}-]|\.0)")
_PHONE_PARENS_TAIL: Final = rf"(?<=\(0)00\)(?<![{_W}]\(000\)) ?000[ .-]0000(?![{_W}-]|\.0)"
_PHONE_INTERNATIONAL: Final = re.compile(r"\+0" + _PHONE_INTERNATIONAL_TAIL)
_PHONE_PARENS: Final = re.compile(r"\(0" + _PHONE_PARENS_TAIL)
_PHONE_DIGITS: Final = re.compile(
    rf"0(?<![{_W}+.-]0)(?:[ .-]000[ .-]000[ .-]0000|00[ .-]000[ .-]0000"
    rf"|0{{0,3}}(?:[ -]0{{2,4}}){{2,4}})(?![{_W}-]|\.0)")

# --- patterns over the text ---------------------------------------------------------------
_EMAIL_DOMAIN: Final = re.compile(
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.([A-Za-z]{2,24})(?![\w-])")
_EMAIL_LOCAL_REVERSED: Final = re.compile(r"[\w.%+-]{1,64}")
_FILE_SUFFIXES: Final = frozenset({
    "png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "txt", "md", "js", "ts",
    "json", "yaml", "yml", "css", "html", "htm", "pdf", "lock", "toml", "cfg", "ini",
})
"""`icon@2x.png`, `pkg@1.2.json`: an @ before a file name, not an address."""
_SECRET_PATTERNS: Final = (
    (None, re.compile(r"sk-(?<![\w-]sk-)(?:[A-Za-z0-9]{1,12}-){0,3}[A-Za-z0-9_-]{20,}")),
    (None, re.compile(r"A[KS]IA(?<![A-Za-z0-9]A[KS]IA)[0-9A-Z]{16}(?![A-Za-z0-9])")),
    ("-----BEGIN ", re.compile(
        r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[^-]|-(?!----END))*"
        r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?")),
)
"""(a literal to test with `in` first, or None: the pattern's own scan is as cheap)."""
_IPV6_HINT: Final = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6: Final = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?:(?:[0-9A-Fa-f]{0,4}:){1,7}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
_HEX_OR_COLON: Final = frozenset("0123456789abcdefABCDEF:")

_CARD_PREFIX: Final = re.compile(
    r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9])"
    r"|35(?:2[89]|[3-8]\d)|62")


_LUHN_DOUBLED: Final = bytes.maketrans(
    b"0123456789", bytes(ord("0") + 2 * digit - 9 * (digit > 4) for digit in range(10)))
"""A digit -> the digit sum of its double, as a digit (`7` -> 14 -> `5`)."""


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits (every second digit from the right
    doubled, its digits summed). Sums bytes: `sum()` over a bytes object runs in C."""
    if digits and not (digits.isdigit() and digits.isascii()):
        raise ValueError("luhn_valid takes ASCII digits")
    encoded = digits.encode()
    total = sum(encoded[::-2]) + sum(encoded[-2::-2].translate(_LUHN_DOUBLED))
    return (total - ord("0") * len(encoded)) % 10 == 0


def _card(value: str) -> bool:
    digits = value.replace(" ", "").replace("-", "")
    return (13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) is not None
            and luhn_valid(digits))


def _ssn(value: str) -> bool:
    area, group, serial = value.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


_BBAN_CLASSES: Final = {"n": "[0-9]", "a": "[A-Z]", "c": "[A-Za-z0-9]"}


def _bban_formats() -> dict[str, re.Pattern[str]]:
    """Country -> the format of its BBAN, from python-stdnum's copy of the IBAN registry
    (`4!n4!n12!c`: 4 digits, 4 digits, 12 letters or digits)."""
    formats = {}
    for _, country, _, properties, _ in numdb.get("iban").prefixes:
        structure = properties.get("bban", "")
        pattern = "".join(f"{_BBAN_CLASSES[kind]}{{{count}}}" for count, kind in
                          re.findall(r"([1-9][0-9]*)!([nac])", structure))
        formats[country] = re.compile(pattern)
    return formats


_BBAN_FORMATS: Final = _bban_formats()
_IBAN_DIGITS: Final = str.maketrans({letter: str(10 + index) for index, letter in
                                     enumerate(string.ascii_uppercase)})


def _iban_valid(value: str) -> bool:
    """The country's BBAN format (length included) and the mod-97 checksum. Not the
    national checks: stdnum's `iban.is_valid` costs ~40 µs a call and its bank registries
    reject some real IBANs (decision 0106)."""
    compact = value.replace(" ", "")
    bban_format = _BBAN_FORMATS.get(compact[:2])
    if bban_format is None or bban_format.fullmatch(compact[4:]) is None:
        return False
    return int((compact[4:] + compact[:4]).translate(_IBAN_DIGITS)) % 97 == 1


def _ipv4(value: str) -> bool:
    return all(int(octet) <= 255 and (octet == "0" or octet[0] != "0")
               for octet in value.split("."))


_PHONE_SEPARATORS: Final = b" .()+-"


def _phone(value: str) -> bool:
    # `value` is ASCII digits and separators (its shape matched a phone pattern)
    digits = value.encode().translate(None, _PHONE_SEPARATORS).decode()
    if not 8 <= len(digits) <= 15:
        return False
    first = value[0]
    if first == "+":
        return digits[0] != "0"
    if first == "(":
        return digits[0] not in "01"
    if len(digits) == 11 and value[1] in " .-":  # 1-NNN-NNN-NNNN
        return first == "1" and digits[1] not in "01"
    if len(digits) == 10 and value[3] in " .-" and value[7] in " .-":  # NNN-NNN-NNNN
        return first not in "01"
    return first == "0" and digits[1] != "0"  # national: 0 then an area code


_NUMBER_START: Final = re.compile(rf"0(?<![{_W}]0)(?=[0 .()-]{{6}})")
"""Where a number-like detector can start: a digit not inside a word, then six more
characters of digits or separators (the shortest match, an IPv4 address, has seven)."""


class _AtNumber(NamedTuple):
    """A pattern tried at a number start."""

    group: str
    """Its group's name in `_Plan.either`."""
    detector: str
    pattern: re.Pattern[str]
    """The whole pattern: it matches `lead` characters before the number start."""
    tail: str
    """The pattern from the number start's digit on (that digit excluded)."""
    check: Callable[[str], bool]
    lead: int
    """Characters of a match before the number start's digit: the `+` or `(`."""


_AT_NUMBER: Final = (
    _AtNumber("phone_international", "phone", _PHONE_INTERNATIONAL, _PHONE_INTERNATIONAL_TAIL,
              _phone, 1),
    _AtNumber("phone_parens", "phone", _PHONE_PARENS, _PHONE_PARENS_TAIL, _phone, 1),
    *(_AtNumber(name, name, pattern, pattern.pattern[1:], check, 0) for name, pattern, check in (
        ("credit_card", _CARD, _card),
        ("us_ssn", _SSN, _ssn),
        ("ipv4", _IPV4, _ipv4),
        ("phone", _PHONE_DIGITS, _phone),
    )),
)
"""Tried in this order at each number start (the first that matches and checks wins).
A phone number that opens with `+` or `(` has its first digit at a number start (eight
digits or more, nothing but digits and separators), and no other pattern can hold a `+`
or a `(`: trying those two first gives them priority over the rest, as their own scan of
the whole text did. The others begin with the start's digit (`0`)."""
_SHAPE_DETECTORS: Final = frozenset({"iban", "credit_card", "us_ssn", "ipv4", "phone"})


class _Taken:
    """Spans already claimed by a detector of higher priority (sorted, disjoint), kept
    as three parallel lists: no object per span until `found()`."""

    __slots__ = ("ends", "names", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.names: list[str] = []

    def free(self, start: int, end: int) -> bool:
        starts = self.starts
        if not starts:
            return True  # the usual case: nothing found yet
        index = bisect.bisect_left(starts, end)
        return index == 0 or self.ends[index - 1] <= start

    def add(self, detector: str, start: int, end: int) -> None:
        index = bisect.bisect_left(self.starts, start)
        self.starts.insert(index, start)
        self.ends.insert(index, end)
        self.names.insert(index, detector)

    def end_at(self, at: int) -> int:
        """The end of the span that holds `at` (one does: `free(at, at + 1)` was False)."""
        return self.ends[bisect.bisect_right(self.starts, at) - 1]

    def found(self) -> list[Found]:
        return list(map(_new_found, zip(self.names, self.starts, self.ends, strict=True)))


_new_found: Final = functools.partial(tuple.__new__, Found)
"""`Found` from a (detector, start, end) tuple, in C (its generated `__new__` is Python)."""


def _numbers(text: str, taken: _Taken, plan: _Plan) -> None:
    """IBANs, phone numbers that open with `+` or `(`, then card numbers, SSNs, IPv4
    addresses and other phone numbers at each number start."""
    shaped = shape(text)
    if "0" not in shaped:
        return
    if plan.iban:
        for match in _IBAN.finditer(shaped):
            start, end = match.span()
            if taken.free(start, end) and _iban_valid(text[start:end]):
                taken.add("iban", start, end)
    either = plan.either
    if either is None:
        return
    steps, free, search = plan.steps, taken.free, either.search
    position = 0
    # One search runs in C from one number start where a pattern matches to the next;
    # Python only sees those (and the ones inside a span found already, skipped whole).
    while (first := search(shaped, position)) is not None:
        at, end = first.span()
        group = first.lastgroup
        if group is None:  # pragma: no cover - every alternative is a named group
            break
        detector, check, lead, later = steps[group]
        start = at - lead
        if free(start, end):  # the usual case: then the start's digit is free too
            if check(text[start:end]):
                taken.add(detector, start, end)
                position = end
                continue
        elif not free(at, at + 1):
            position = taken.end_at(at)  # inside an IBAN or a phone number found already
            continue
        position = at + 1
        # The alternation tried the earlier patterns already; a later one gets its turn
        # when the first match fails its check (a 16-digit number that is no card may
        # still be a phone number).
        for detector, pattern, check, lead in later:
            hit = pattern.match(shaped, at - lead)
            if hit is None:
                continue
            start, end = hit.span()
            if free(start, end) and check(text[start:end]):
                taken.add(detector, start, end)
                position = end
                break


_Later = tuple[str, re.Pattern[str], Callable[[str], bool], int]
"""(detector, whole pattern, check, lead) of a pattern tried after another failed."""
_Step = tuple[str, Callable[[str], bool], int, tuple[_Later, ...]]
"""(detector, check, lead, the patterns after it) of a group of `_Plan.either`."""


class _Plan(NamedTuple):
    """What `find` runs for one set of detectors, worked out once per set (a policy's
    set is the same on every request)."""

    on_text: tuple[Callable[[str, _Taken], None], ...]
    numbers: bool
    """Whether any detector runs on the text's shape."""
    iban: bool
    steps: dict[str, _Step]
    """Group name -> what to do when its pattern matched at a number start."""
    either: re.Pattern[str] | None
    """A number start (`_NUMBER_START`) where one of the patterns asked for matches: their
    alternation, in order, after the start's digit (every pattern begins with it)."""


@functools.lru_cache(maxsize=256)
def _plan(detectors: tuple[str, ...]) -> _Plan:
    active = frozenset(detectors)
    tried = tuple(entry for entry in _AT_NUMBER if entry.detector in active)
    either = None
    if tried:
        either = re.compile(_NUMBER_START.pattern + "(?:" + "|".join(
            f"(?P<{entry.group}>{entry.tail})" for entry in tried) + ")")
    return _Plan(
        on_text=tuple(scan for name, scan in _ON_TEXT.items() if name in active),
        numbers=bool(active & _SHAPE_DETECTORS), iban="iban" in active, either=either,
        steps={entry.group: (entry.detector, entry.check, entry.lead, tuple(
            (after.detector, after.pattern, after.check, after.lead)
            for after in tried[index + 1:])) for index, entry in enumerate(tried)})


def _emails(text: str, taken: _Taken) -> None:
    if "@" not in text:
        return
    for match in _EMAIL_DOMAIN.finditer(text):
        at = match.start()
        if match.group(1).lower() in _FILE_SUFFIXES:
            continue
        local = _EMAIL_LOCAL_REVERSED.match(text[max(0, at - 64):at][::-1])
        if local is None:
            continue
        start = at - local.end()
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_.%+-"):
            continue  # a local part longer than 64 characters: not an address
            # (`isalnum` or `_` is the regex engine's `\w`: the same test, no match object)
        if taken.free(start, match.end()):
            taken.add("email", start, match.end())


def _secrets(text: str, taken: _Taken) -> None:
    for literal, pattern in _SECRET_PATTERNS:
        if literal is not None and literal not in text:
            continue
        for match in pattern.finditer(text):
            if taken.free(*match.span()):
                taken.add("secret", *match.span())


def _ipv6(text: str, taken: _Taken) -> None:
    if ":" not in text:
        return
    after = 0
    for hint in _IPV6_HINT.finditer(text):
        start = hint.start()
        if start < after:
            continue
        floor = max(0, start - 45)
        while start > floor and text[start - 1] in _HEX_OR_COLON:
            start -= 1
        match = _IPV6.match(text, start)
        if match is None or match.end() <= hint.start():
            continue
        after = match.end()
        value = match.group()
        if not _ipv6_valid(value):
            continue
        if taken.free(match.start(), match.end()):
            taken.add("ipv6", match.start(), match.end())


def _ipv6_valid(value: str) -> bool:
    """Whether the C library parses `value` as an IPv6 address: 0.1 µs, where
    `ipaddress.IPv6Address` takes 2 µs (the unit tests check that they agree)."""
    try:
        socket.inet_pton(socket.AF_INET6, value)
    except OSError:
        return False
    return True


_ON_TEXT: Final[dict[str, Callable[[str, _Taken], None]]] = {
    "secret": _secrets,
    "email": _emails,
    "ipv6": _ipv6,
}


def find(text: str, detectors: Iterable[str]) -> list[Found]:
    """Every match of `detectors` in `text`, in text order, without overlaps: of two
    overlapping matches the one of the detector earlier in `settings.DETECTORS` wins
    (secret, email, ipv6, then the number-like ones)."""
    plan = _plan(detectors if isinstance(detectors, tuple) else tuple(detectors))
    taken = _Taken()
    for scan in plan.on_text:
        scan(text, taken)
    if plan.numbers:
        _numbers(text, taken, plan)
    return taken.found()
