"""PII and secret detectors: linear-time regular expressions, then a validity check.

Each detector is one or more candidate patterns plus a check that rejects near misses:
the Luhn sum and issuer prefixes of card numbers, the country length and mod-97 checksum
of IBANs (`python-stdnum`), the stdlib's parser for IPv6, octet ranges for IPv4, the
reserved ranges of SSNs, digit counts of phone numbers.

Speed (bench/guardrails.py): Python's regex engine scans a character class at roughly
7 ns a character, but jumps to a literal prefix at memchr speed. So number-like
detectors run on the text's *shape* (one `translate`: every ASCII digit becomes `0`,
upper-case letter `A`, lower-case `a`, the rest stays), where each pattern starts with
a literal (`0`, `AA00`, `000-00-0000`, `+0`, `(000)`); emails start at `@`, secrets at
`sk-`, `AKIA`, `ASIA`, `-----BEGIN`, IPv6 at a `:` between hex digits. Look-behinds
come after that literal, so the scan never enters the matcher elsewhere.

Every pattern is free of nested unbounded quantifiers over overlapping classes: the cost
is linear in the text (tests/unit/test_guardrails_pii.py feeds adversarial inputs). Not
found on purpose (docs/guardrails.md): SSNs and phone numbers written without
separators, lower-case IBANs, non-ASCII digits, names and street addresses.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
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
_PHONE_INTERNATIONAL: Final = re.compile(
    rf"\+0(?<![{_W}+.-]\+0)0{{0,2}}(?:[ .-]?\(?0{{1,4}}\)?){{2,5}}(?![{_W}-]|\.0)")
_PHONE_PARENS: Final = re.compile(rf"\(000\)(?<![{_W}]\(000\)) ?000[ .-]0000(?![{_W}-]|\.0)")
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
    ("sk-", re.compile(r"sk-(?<![\w-]sk-)(?:[A-Za-z0-9]{1,12}-){0,3}[A-Za-z0-9_-]{20,}")),
    ("AKIA", re.compile(r"AKIA(?<![A-Za-z0-9]AKIA)[0-9A-Z]{16}(?![A-Za-z0-9])")),
    ("ASIA", re.compile(r"ASIA(?<![A-Za-z0-9]ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])")),
    ("-----BEGIN ", re.compile(
        r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[^-]|-(?!----END))*"
        r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?")),
)
_IPV6_HINT: Final = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6: Final = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?:(?:[0-9A-Fa-f]{0,4}:){1,7}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
_HEX_OR_COLON: Final = frozenset("0123456789abcdefABCDEF:")

_CARD_PREFIX: Final = re.compile(
    r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9])"
    r"|35(?:2[89]|[3-8]\d)|62")


_LUHN_DOUBLED: Final = {str(digit): (2 * digit) - 9 * (digit > 4) for digit in range(10)}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits (every second digit from the right
    doubled, its digits summed)."""
    total = sum(map(int, digits[::-2])) + sum(map(_LUHN_DOUBLED.__getitem__, digits[-2::-2]))
    return total % 10 == 0


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


def _phone(value: str) -> bool:
    digits = "".join(filter(str.isdigit, value))
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
_AT_NUMBER: Final[tuple[tuple[str, re.Pattern[str], Callable[[str], bool]], ...]] = (
    ("credit_card", _CARD, _card),
    ("us_ssn", _SSN, _ssn),
    ("ipv4", _IPV4, _ipv4),
    ("phone", _PHONE_DIGITS, _phone),
)
"""Tried in this order at each number start (the first that matches and checks wins)."""
_SHAPE_DETECTORS: Final = frozenset({"iban", "credit_card", "us_ssn", "ipv4", "phone"})


class _Taken:
    """Spans already claimed by a detector of higher priority (sorted, disjoint)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.found: list[Found] = []

    def free(self, start: int, end: int) -> bool:
        index = bisect.bisect_left(self.starts, end)
        return index == 0 or self.found[index - 1].end <= start

    def add(self, detector: str, start: int, end: int) -> None:
        index = bisect.bisect_left(self.starts, start)
        self.starts.insert(index, start)
        self.found.insert(index, Found(detector, start, end))


def _numbers(text: str, taken: _Taken, active: frozenset[str]) -> None:
    """IBANs, phone numbers that open with `+` or `(`, then card numbers, SSNs, IPv4
    addresses and other phone numbers at each number start."""
    shaped = shape(text)
    if "0" not in shaped:
        return
    if "iban" in active:
        for match in _IBAN.finditer(shaped):
            start, end = match.span()
            if taken.free(start, end) and _iban_valid(text[start:end]):
                taken.add("iban", start, end)
    if "phone" in active:
        for pattern in (_PHONE_INTERNATIONAL, _PHONE_PARENS):
            for match in pattern.finditer(shaped):
                start, end = match.span()
                if taken.free(start, end) and _phone(text[start:end]):
                    taken.add("phone", start, end)
    tried = tuple(entry for entry in _AT_NUMBER if entry[0] in active)
    if not tried:
        return
    names = tuple(name for name, _, _ in tried)
    either = _either(names)
    position = 0
    for candidate in _NUMBER_START.finditer(shaped):
        at = candidate.start()
        if at < position or not taken.free(at, at + 1):
            continue  # inside a match of this loop, an IBAN or a phone number found already
        first = either.match(shaped, at)  # one call for the usual case: nothing here
        if first is None or first.lastgroup is None:
            continue
        # The alternation tried the earlier patterns already; a later one gets its turn
        # when the first match fails its check (a 16-digit number that is no card may
        # still be a phone number).
        for name, pattern, check in tried[names.index(first.lastgroup):]:
            hit = first if name == first.lastgroup else pattern.match(shaped, at)
            if hit is None:
                continue
            start, end = hit.span()
            if taken.free(start, end) and check(text[start:end]):
                taken.add(name, start, end)
                position = end
                break


@functools.cache
def _either(names: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern that tries `names`' number patterns in order at one position."""
    patterns = {name: pattern.pattern for name, pattern, _ in _AT_NUMBER}
    return re.compile("|".join(f"(?P<{name}>{patterns[name]})" for name in names))


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
        if start > 0 and _EMAIL_LOCAL_REVERSED.match(text[start - 1]):
            continue  # a local part longer than 64 characters: not an address
        if taken.free(start, match.end()):
            taken.add("email", start, match.end())


def _secrets(text: str, taken: _Taken) -> None:
    for literal, pattern in _SECRET_PATTERNS:
        if literal not in text:
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
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            continue
        if taken.free(match.start(), match.end()):
            taken.add("ipv6", match.start(), match.end())


_ON_TEXT: Final[dict[str, Callable[[str, _Taken], None]]] = {
    "secret": _secrets,
    "email": _emails,
    "ipv6": _ipv6,
}


def find(text: str, detectors: Iterable[str]) -> list[Found]:
    """Every match of `detectors` in `text`, in text order, without overlaps: of two
    overlapping matches the one of the detector earlier in `settings.DETECTORS` wins
    (secret, email, ipv6, then the number-like ones)."""
    taken = _Taken()
    active = frozenset(detectors)
    for name, scan in _ON_TEXT.items():
        if name in active:
            scan(text, taken)
    if active & _SHAPE_DETECTORS:
        _numbers(text, taken, active)
    return taken.found
