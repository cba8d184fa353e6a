"""Offline PII detection, redaction, masking (with restoration) for prompts and answers.

Detectors: e-mail, phone numbers (`phonenumbers`), payment cards (Luhn + issuer prefixes),
Canadian SIN (Luhn, any first digit; see `_sin`), US SSN (`python-stdnum`), IBAN
(`python-stdnum`, mod-97), IP addresses (`ipaddress`), Canadian postal codes, dates of birth in
context, and custom patterns. Checksums reject near-misses: a 9-digit number that fails the SIN
check is not a SIN.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import phonenumbers
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.us import ssn as std_ssn

LABELS = ("EMAIL", "PHONE", "CARD", "SIN", "SSN", "IBAN", "IP", "POSTAL_CODE", "DOB")
# where spans overlap, checksummed identifiers win over looser patterns (a card is not a phone)
PRIORITY = {"EMAIL": 0, "IBAN": 1, "CARD": 2, "SSN": 3, "SIN": 4, "IP": 5, "POSTAL_CODE": 6,
            "DOB": 7, "PHONE": 8}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_NINE = re.compile(r"(?<![\d-])\d{3}[ -]?\d{3}[ -]?\d{3}(?![\d-])")
_SSN = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")  # a final "." ends a sentence
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_POSTAL = re.compile(r"\b[ABCEGHJ-NPRSTVXY]\d[ABCEGHJ-NPRSTV-Z] ?\d[ABCEGHJ-NPRSTV-Z]\d\b")
_DATE = (r"(?:\d{4}-\d{2}-\d{2}|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|"
         r"(?:\d{1,2} )?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.? \d{1,2}?,? ?\d{4})")
_DOB = re.compile(r"(?i)\b(?:born(?: on)?|date of birth|d\.?o\.?b\.?|birth ?date|birthday|"
                  r"n[ée]e? le)\s*(?:is|was|:)?\s*(" + _DATE + r")")
# words that say a number is a SIN, in English and French, shortly before it
_SIN_CONTEXT = re.compile(r"(?i)(?:\bS\.?I\.?N\b|social insurance|\bN\.?A\.?S\b|assurance sociale)")
SIN_CONTEXT_CHARS = 48
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6(?:011|5))")


@dataclass(frozen=True)
class Finding:
    label: str
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class PiiConfig:
    labels: tuple[str, ...] = LABELS
    phone_region: str = "CA"  # numbers without a country code are read in this region
    custom: tuple[tuple[str, str], ...] = ()  # (label, regex), e.g. ("PATIENT_ID", r"PT-\d{6}")

    def __post_init__(self) -> None:
        for label, pattern in self.custom:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"custom PII pattern {label!r} is not a valid regex: {e}") from None


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _is_card(s: str) -> bool:
    d = _digits(s)
    return 13 <= len(d) <= 19 and bool(_CARD_PREFIX.match(d)) and luhn.is_valid(d)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _always(_: str) -> bool:
    return True


# label -> (patterns, check of the matched text, regex group that is the finding), in the order
# candidates are produced (ties in `detect` keep it)
_RULES = (("EMAIL", (_EMAIL,), _always, 0), ("IBAN", (_IBAN,), std_iban.is_valid, 0),
          ("CARD", (_CARD,), _is_card, 0), ("SSN", (_SSN,), std_ssn.is_valid, 0),
          ("IP", (_IPV4, _IPV6), _is_ip, 0),
          ("POSTAL_CODE", (_POSTAL,), _always, 0), ("DOB", (_DOB,), _always, 1))


def _sin(text: str):
    """Canadian SINs: nine digits (grouped 3-3-3 or not) passing the Luhn check. Numbers that
    begin with 1-7 or 9 (the provinces' and temporary residents' ranges) count on their checksum
    alone; 0 and 8 (never issued to people: the Government of Canada's own example is 046 454
    286) only after a context word such as "SIN" or "NAS", since one 9-digit number in ten passes
    the Luhn check by chance. python-stdnum refuses 0 and 8 outright, so it is not used here."""
    for m in _NINE.finditer(text):
        d = _digits(m.group())
        if not luhn.is_valid(d):
            continue
        if d[0] in "08" and not _SIN_CONTEXT.search(text[max(0, m.start() - SIN_CONTEXT_CHARS):m.start()]):
            continue
        yield "SIN", m.start(), m.end()


def _candidates(text: str, cfg: PiiConfig):
    want = set(cfg.labels)
    if "SIN" in want:
        yield from _sin(text)
    for label, patterns, check, group in _RULES:
        if label in want:
            for rx in patterns:
                for m in rx.finditer(text):
                    if check(m.group()):
                        yield label, m.start(group), m.end(group)
    if "PHONE" in want:
        for m in phonenumbers.PhoneNumberMatcher(text, cfg.phone_region,
                                                 leniency=phonenumbers.Leniency.VALID):
            start = m.start
            if m.raw_string.startswith("(") and ")" not in m.raw_string:
                start += 1  # "(613-499 4855)": the parenthesis wraps the number, not its area code
            yield "PHONE", start, m.end
    for label, pattern in cfg.custom:
        for m in re.finditer(pattern, text):
            yield label, m.start(), m.end()


def detect(text: str, cfg: PiiConfig = PiiConfig()) -> list[Finding]:
    """Non-overlapping findings, in text order. Where spans overlap, PRIORITY decides, then the
    longer span; custom patterns come last."""
    found = sorted(_candidates(text, cfg), key=lambda f: (PRIORITY.get(f[0], 99), -(f[2] - f[1])))
    taken: list[tuple[int, int]] = []
    out = []
    for label, s, e in found:
        if any(s < te and ts < e for ts, te in taken):
            continue
        taken.append((s, e))
        out.append(Finding(label, s, e, text[s:e]))
    return sorted(out, key=lambda f: f.start)


def redact(text: str, cfg: PiiConfig = PiiConfig()) -> tuple[str, list[Finding]]:
    """Replace each finding with [LABEL]."""
    findings = detect(text, cfg)
    for f in reversed(findings):
        text = text[:f.start] + f"[{f.label}]" + text[f.end:]
    return text, findings


@dataclass(frozen=True)
class TextScan:
    """What `scan_texts` found in a request's texts: the labels, and (masking) the masked texts
    with the placeholder mapping."""

    labels: frozenset[str]
    masked: tuple[str, ...] | None = None
    mapping: tuple[tuple[str, str], ...] = ()


def scan_texts(texts: tuple[str, ...], cfg: PiiConfig, mask: bool) -> TextScan:
    """All of one request's PII work in one call (a worker process runs it for large requests:
    the regex scans hold the GIL for as long as the text is long)."""
    labels = frozenset(f.label for t in texts for f in detect(t, cfg))
    if not mask or not labels:
        return TextScan(labels)
    masker = Masker(cfg)
    masked = tuple(masker.mask(t) for t in texts)
    return TextScan(labels, masked, tuple(masker.mapping.items()))


def redact_texts(texts: tuple[str, ...], cfg: PiiConfig = PiiConfig()) -> tuple[str, ...]:
    return tuple(redact(t, cfg)[0] for t in texts)


@dataclass
class Masker:
    """Masks PII before the model with placeholders, and restores them in the answer. The same
    value always gets the same placeholder within one conversation."""

    cfg: PiiConfig = field(default_factory=PiiConfig)
    mapping: dict[str, str] = field(default_factory=dict)  # placeholder -> original

    def mask(self, text: str) -> str:
        findings = detect(text, self.cfg)
        reverse = {v: k for k, v in self.mapping.items()}
        for f in reversed(findings):
            ph = reverse.get(f.text)
            if ph is None:
                ph = f"<{f.label}_{sum(1 for k in self.mapping if k.startswith('<' + f.label)) + 1}>"
                self.mapping[ph] = f.text
                reverse[f.text] = ph
            text = text[:f.start] + ph + text[f.end:]
        return text

    def restore(self, text: str) -> str:
        for ph, original in self.mapping.items():
            text = text.replace(ph, original)
        return text


class Restorer:
    """Restores placeholders in a stream of text deltas: holds back a possible partial
    placeholder ("<EMA") until it is complete or clearly is not one."""

    def __init__(self, masker: Masker) -> None:
        self.masker, self.buffer = masker, ""
        self.hold = max((len(k) for k in masker.mapping), default=0)

    def feed(self, delta: str) -> str:
        if not self.masker.mapping:
            return delta
        self.buffer += delta
        cut = self.buffer.rfind("<")
        if cut >= 0 and ">" not in self.buffer[cut:] and len(self.buffer) - cut < self.hold:
            out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        else:
            out, self.buffer = self.buffer, ""
        return self.masker.restore(out)

    def flush(self) -> str:
        out, self.buffer = self.masker.restore(self.buffer), ""
        return out
