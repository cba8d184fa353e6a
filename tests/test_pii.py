import pytest

from benchmarks.pii import make_cases, score
from inhouse.governance.pii import Masker, PiiConfig, detect, redact


@pytest.mark.parametrize("text, label, value", [
    ("mail jane.doe@example.com now", "EMAIL", "jane.doe@example.com"),
    ("call (416) 555-0199 today", "PHONE", "(416) 555-0199"),
    ("call +44 20 7946 0958", "PHONE", "+44 20 7946 0958"),
    ("card 4111 1111 1111 1111 ok", "CARD", "4111 1111 1111 1111"),
    ("SIN 130 692 544.", "SIN", "130 692 544"),
    ("SSN 536-90-4399", "SSN", "536-90-4399"),  # (078-05-1120, the Woolworth card, is blacklisted)
    ("IBAN GB82 WEST 1234 5698 7654 32.", "IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("from 10.0.0.7.", "IP", "10.0.0.7"),
    ("from 2001:db8::1 too", "IP", "2001:db8::1"),
    ("at M5V 2T6 in Toronto", "POSTAL_CODE", "M5V 2T6"),
    ("She was born on 12/03/1984.", "DOB", "12/03/1984"),
    ("date of birth: 1990-01-31", "DOB", "1990-01-31"),
])
def test_each_kind_is_found(text, label, value):
    assert [(f.label, f.text) for f in detect(text)] == [(label, value)]


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # fails Luhn
    "SIN 130 692 545",  # fails the SIN check
    "IBAN GB83 WEST 1234 5698 7654 32",  # wrong check digits
    "meeting on 2024-05-01",  # a date, not a birth date
    "ping 999.1.1.1",  # not an address
    "code D5Q 2T6",  # letters no Canadian postal code uses
    "user@localhost",  # no domain
    "version 3.11.7 released",
])
def test_near_misses_are_not_flagged(text):
    assert detect(text) == []


def test_redact_and_mask_then_restore():
    text = "Reach jane@x.org or 416-555-0199; again jane@x.org."
    redacted, findings = redact(text)
    assert redacted == "Reach [EMAIL] or [PHONE]; again [EMAIL]." and len(findings) == 3
    m = Masker()
    masked = m.mask(text)
    assert masked == "Reach <EMAIL_1> or <PHONE_1>; again <EMAIL_1>."
    assert m.restore("I wrote to <EMAIL_1> and called <PHONE_1>.") == \
        "I wrote to jane@x.org and called 416-555-0199."


def test_custom_patterns():
    cfg = PiiConfig(custom=(("PATIENT_ID", r"PT-\d{6}"),))
    assert [(f.label, f.text) for f in detect("file PT-004211 closed", cfg)] == [("PATIENT_ID", "PT-004211")]
    with pytest.raises(ValueError, match="not a valid regex"):
        PiiConfig(custom=(("BAD", "("),))


def test_quality_on_a_synthetic_labelled_set():
    result = score(make_cases(320, seed=7))
    assert result["ALL"]["precision"] >= 0.95 and result["ALL"]["recall"] >= 0.95, result


# ---- issue 17, finding 9: the Government of Canada's own example SIN -------------------------------
@pytest.mark.parametrize("text, found", [
    ("My SIN is 046 454 286.", "046 454 286"),
    ("NAS : 046-454-286", "046-454-286"),
    ("social insurance number 046454286", "046454286"),
    ("SIN: 800 000 002", "800 000 002"),  # 8 first, Luhn-valid, in context
    ("Order 046454286 shipped.", None),  # 0 first without context: a reference number
    ("Invoice 800 000 002", None),
    ("SIN 046 454 287", None),  # fails Luhn
])
def test_sins_whatever_their_first_digit(text, found):
    got = [f.text for f in detect(text) if f.label == "SIN"]
    assert got == ([found] if found else [])
