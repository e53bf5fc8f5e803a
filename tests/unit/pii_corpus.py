"""A labelled corpus for the PII detectors: texts and the exact values each should find.

Positives use published test numbers (card networks' test PANs, the IBAN registry's
examples, RFC 5737 / RFC 3849 documentation addresses) and fake keys; near misses are
what real prompts are full of: dates, versions, times, order numbers, hashes, UUIDs,
decorators, file names, numbers with a wrong checksum. `tests/unit/test_guardrails_pii.py`
computes precision and recall per detector from it; docs/guardrails.md quotes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CORPUS", "Case"]


@dataclass(frozen=True, slots=True)
class Case:
    text: str
    expected: tuple[tuple[str, str], ...] = ()
    """(detector, exact matched text), in text order; empty: nothing to find."""


def _each(detector: str, template: str, values: list[str]) -> list[Case]:
    return [Case(template.format(value), ((detector, value),)) for value in values]


def _none(template: str, values: list[str]) -> list[Case]:
    return [Case(template.format(value)) for value in values]


_CARDS = [
    "4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "5555555555554444",
    "5555 5555 5555 4444", "5105105105105100", "378282246310005", "3782 822463 10005",
    "371449635398431", "6011111111111117", "6011 0009 9013 9424", "3530111333300000",
    "4012888888881881", "4242 4242 4242 4242", "2223003122003222", "30569309025904",
    "3566002020360505", "6200000000000005", "4000056655665556", "5200828282828210",
]
_BAD_CARDS = [
    "4111111111111112", "4111 1111 1111 1112", "5555555555554445", "1234567812345678",
    "0000000000000000", "9111111111111111", "378282246310006", "6011111111111118",
    "4242 4242 4242 4241", "1111222233334444",
]
_IBANS = [
    "DE89370400440532013000", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432",
    "GB82 WEST 1234 5698 7654 32", "FR1420041010050500013M02606", "NL91ABNA0417164300",
    "ES9121000418450200051332", "IT60X0542811101000000123456", "BE68539007547034",
    "CH9300762011623852957", "AT611904300234573201", "PL61109010140000071219812874",
    "SE4550000000058398257466", "NO9386011117947", "DK5000400440116243",
    "FI2112345600000785", "IE29AIBK93115212345678", "LU280019400644750000",
    "GR1601101250000000012300695", "PT50000201231234567890154",
]
_BAD_IBANS = [
    "DE89370400440532013001", "GB82WEST12345698765433", "FR1420041010050500013M02607",
    "NL91ABNA0417164301", "XX89370400440532013000", "DE00370400440532013000",
    "ES9121000418450200051333", "BE68539007547035", "CH9300762011623852958",
    "AT611904300234573202",
]
_EMAILS = [
    "alice@example.com", "bob.smith@example.co.uk", "carol+news@example.org",
    "dave_99@mail.example.net", "e.f-g@sub.domain.example.io", "first.last@example.travel",
    "x@example.de", "support@example-shop.com", "o'brien@example.com".replace("'", ""),
    "UPPER@EXAMPLE.COM", "a.b.c.d@example.museum", "user%tag@example.com",
]
_NOT_EMAILS = [
    "@app.route('/x')", "icon@2x.png", "logo@3x.jpg", "user@localhost", "foo@bar",
    "a @ b . com", "@channel please review", "pkg@1.2.json", "name at example dot com",
    "email me: <redacted>",
]
_PHONES = [
    "+1 415 555 0132", "+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00",
    "(212) 555-0100", "212-555-0100", "212.555.0100", "1-800-555-0199", "+61 2 9374 4000",
    "030 1234 5678", "020 7946 0958", "+41 44 668 18 00", "(650) 253-0000",
    "+81 3-1234-5678", "06 12 34 56 78",
]
_NOT_PHONES = [
    "2024-01-15", "15.01.2024", "v1.2.3", "order 123456", "ticket #4821",
    "12:30:45", "3.14159", "1,234,567", "ISBN 978-3-16-148410-0", "ref 112-233",
    "room 101", "100-200", "1 2 3 4 5",
]
_SSNS = ["123-45-6789", "078-05-1120", "219-09-9999", "536-22-1234", "772-10-0001"]
_NOT_SSNS = ["000-12-3456", "666-12-3456", "923-45-6789", "123-00-6789", "123-45-0000",
             "123-456-789"]
_IPV4 = ["192.0.2.1", "198.51.100.23", "203.0.113.254", "10.0.0.1", "172.16.254.1",
         "8.8.8.8", "255.255.255.255"]
_NOT_IPV4 = ["256.1.1.1", "1.2.3", "1.2.3.4.5", "999.999.999.999", "192.168.01.1",
             "version 10.0.19041"]
_IPV6 = ["2001:db8::1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "fe80::1",
         "::1", "2001:db8:0:0:1:0:0:1", "::ffff:192.0.2.128"]
_NOT_IPV6 = ["12:30:45", "a:b:c", "std::vector", "http://x", "ab::cd::ef", "ratio 3:2"]
_SECRETS = [
    "sk-abcdefghijklmnopqrstuvwxyz012345", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXyZ0",
    "sk-ant-api03-abcdefghijklmnopqrstuvwxyzABCDEF", "AKIAIOSFODNN7EXAMPLE",
    "ASIAY34FZKBOKMUTVV7A",
    "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA\n"
    "-----END PRIVATE KEY-----",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAw\n-----END RSA PRIVATE KEY-----",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
    "-----END OPENSSH PRIVATE KEY-----",
]
_NOT_SECRETS = [
    "task-based planning", "desk-top", "sk-short", "AKIA1234", "risk-adjusted returns",
    "-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAK\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----", "ASIAN markets",
]

CORPUS: tuple[Case, ...] = (
    *_each("credit_card", "Please charge card {} for the order.", _CARDS),
    *_none("Card number {} was declined.", _BAD_CARDS),
    *_each("iban", "Wire the amount to {} by Friday.", _IBANS),
    *_none("The IBAN {} failed validation.", _BAD_IBANS),
    *_each("email", "Contact {} about the invoice.", _EMAILS),
    *_none("In the code: {}", _NOT_EMAILS),
    *_each("phone", "Call me on {} tomorrow.", _PHONES),
    *_none("See {} in the log.", _NOT_PHONES),
    *_each("us_ssn", "My SSN is {}.", _SSNS),
    *_none("The value {} is not an SSN.", _NOT_SSNS),
    *_each("ipv4", "The server at {} is down.", _IPV4),
    *_none("Found {} in the file.", _NOT_IPV4),
    *_each("ipv6", "Ping {} now.", _IPV6),
    *_none("Use {} here.", _NOT_IPV6),
    *_each("secret", "my key is {} thanks", _SECRETS),
    *_none("We talked about {} today.", _NOT_SECRETS),
    # Inside code blocks and JSON, values are still values.
    Case("```python\nsend_mail('ops@example.com')\n```", (("email", "ops@example.com"),)),
    Case("```\ncurl -H 'Authorization: Bearer sk-abcdefghijklmnopqrstuvwx12'\n```",
         (("secret", "sk-abcdefghijklmnopqrstuvwx12"),)),
    Case('{"card": "4111111111111111", "note": "test"}',
         (("credit_card", "4111111111111111"),)),
    Case("`git config user.email dev@example.com`", (("email", "dev@example.com"),)),
    Case("host = '10.1.2.3'  # staging", (("ipv4", "10.1.2.3"),)),
    Case("aws_access_key_id=AKIAIOSFODNN7EXAMPLE", (("secret", "AKIAIOSFODNN7EXAMPLE"),)),
    # Several kinds in one text.
    Case("Name: Jane, email jane@example.com, phone +44 20 7946 0958, IBAN "
         "GB82WEST12345698765432.",
         (("email", "jane@example.com"), ("phone", "+44 20 7946 0958"),
          ("iban", "GB82WEST12345698765432"))),
    Case("SSN 123-45-6789 and card 5555 5555 5555 4444 on file.",
         (("us_ssn", "123-45-6789"), ("credit_card", "5555 5555 5555 4444"))),
    Case("From 192.0.2.1 to 2001:db8::1 via alice@example.com",
         (("ipv4", "192.0.2.1"), ("ipv6", "2001:db8::1"), ("email", "alice@example.com"))),
    # Near misses that look like several kinds.
    Case("commit 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"),
    Case("uuid 123e4567-e89b-12d3-a456-426614174000"),
    Case("The meeting is on 2024-03-15 at 14:30 in room 4.12."),
    Case("Install numpy==1.26.4 and python 3.11.9."),
    Case("Invoice INV-2024-000123, total 1,299.00 EUR."),
    Case("Coordinates 48.8566, 2.3522 (Paris)."),
    Case("Tracking 1Z999AA10123456784."),
    Case("The sequence 1 1 2 3 5 8 13 21 34 55 89 144 233."),
    # Known limits, labelled with the truth: they count against precision or recall.
    Case("Call 4155550132 after six.", (("phone", "4155550132"),)),
    Case("Local number 555-0100 only.", (("phone", "555-0100"),)),
    Case("SSN 123456789 without dashes.", (("us_ssn", "123456789"),)),
    Case("lower-case iban de89370400440532013000", (("iban", "de89370400440532013000"),)),
    Case("Upgrade the firmware to 1.2.3.4 tonight."),
    Case("See section 10.1.2.3 of the standard."),
    Case("Order number 4000 0000 0000 0002 is shipped."),
    Case("write to jane dot doe at example dot com"),
)
