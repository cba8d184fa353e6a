"""Precision and recall of the offline PII detector on a labelled synthetic set.

    python benchmarks/pii.py [--cases 600] [--seed 0]

Generates (seeded) sentences holding one value each: valid ones (correct checksums) and
near-misses that must not be flagged (a card failing Luhn, a SIN or IBAN with a wrong check
digit, a date outside a birth context, an impossible IP, a postal code with a forbidden letter,
an address without a domain). Scores span-level matches per label. Writes
benchmarks/results/pii.json.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phonenumbers  # noqa: E402
from stdnum import iban as std_iban  # noqa: E402
from stdnum import luhn  # noqa: E402

from inhouse.governance.pii import detect  # noqa: E402

POSTAL_FIRST, POSTAL_OTHER = "ABCEGHJKLMNPRSTVXY", "ABCEGHJKLMNPRSTVWXYZ"


def _luhn_complete(prefix: str) -> str:
    return prefix + luhn.calc_check_digit(prefix)


def _valid(kind: str, r: random.Random) -> str:
    if kind == "EMAIL":
        return f"{r.choice(['jane', 'a.b', 'x_y', 'sam+tag'])}{r.randint(1, 999)}@" \
               f"{r.choice(['example.com', 'clinic.ca', 'mail.co.uk'])}"
    if kind == "PHONE":
        while True:
            n = f"+1 {r.choice(['416', '604', '514', '613', '902'])} {r.randint(200, 999)} " \
                f"{r.randint(0, 9999):04d}"
            if phonenumbers.is_valid_number(phonenumbers.parse(n)):
                return n if r.random() < 0.5 else n[3:].replace(" ", "-", 1)
    if kind == "CARD":
        d = _luhn_complete(r.choice(["4", "51", "55", "37"]) + "".join(
            str(r.randint(0, 9)) for _ in range(14 if r.random() < .8 else 13)))
        return " ".join(d[i:i + 4] for i in range(0, len(d), 4)) if r.random() < .5 else d
    if kind == "SIN":  # 0 and 8 first: never issued to people; found only after a context word
        d = _luhn_complete(str(r.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])) + "".join(
            str(r.randint(0, 9)) for _ in range(7)))
        return f"{d[:3]} {d[3:6]} {d[6:]}"
    if kind == "IBAN":
        bban = "WEST" + "".join(str(r.randint(0, 9)) for _ in range(14))
        check = std_iban.calc_check_digits("GB00" + bban)
        s = "GB" + check + bban
        return " ".join(s[i:i + 4] for i in range(0, len(s), 4))
    if kind == "IP":
        return ".".join(str(r.randint(1, 254)) for _ in range(4)) if r.random() < .8 else \
            f"2001:db8::{r.randint(1, 0xffff):x}"
    if kind == "POSTAL_CODE":
        return f"{r.choice(POSTAL_FIRST)}{r.randint(0, 9)}{r.choice(POSTAL_OTHER)} " \
               f"{r.randint(0, 9)}{r.choice(POSTAL_OTHER)}{r.randint(0, 9)}"
    if kind == "DOB":
        return f"{r.randint(1940, 2010)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    raise ValueError(kind)


def _near_miss(kind: str, r: random.Random) -> str:
    if kind in ("CARD", "SIN"):
        good = _valid(kind, r)
        last = good[-1]
        return good[:-1] + str((int(last) + r.randint(1, 9)) % 10)
    if kind == "IBAN":
        s = _valid("IBAN", r).replace(" ", "")
        s = s[:2] + f"{(int(s[2:4]) + 1) % 100:02d}" + s[4:]
        return " ".join(s[i:i + 4] for i in range(0, len(s), 4))
    if kind == "IP":
        return f"{r.randint(300, 999)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}"
    if kind == "POSTAL_CODE":
        return f"D{r.randint(0, 9)}Q {r.randint(0, 9)}{r.choice(POSTAL_OTHER)}{r.randint(0, 9)}"
    if kind == "EMAIL":
        return f"user{r.randint(1, 99)}@localhost"
    if kind == "DOB":  # a date, but no birth context
        return _valid("DOB", r)
    if kind == "SIN-0":  # passes Luhn, begins with 0, no SIN context: a reference number
        return _luhn_complete("0" + "".join(str(r.randint(0, 9)) for _ in range(7)))
    if kind == "PHONE":
        return f"order {r.randint(10000, 99999)}"
    raise ValueError(kind)


TEMPLATES = {
    "DOB": ["Patient born on {v}, admitted today.", "DOB: {v}", "Her date of birth is {v}."],
    "DOB-miss": ["The meeting is on {v}.", "Invoice dated {v}."],
    "SIN": ["My SIN is {v}.", "Social insurance number: {v}", "NAS : {v}", "Record: {v}.",
            "The value {v} was entered by the clerk."],
    "SIN-0-miss": ["Order {v} shipped.", "Reference {v}, please quote it."],
}
GENERIC = ["Please contact me at {v} tomorrow.", "Record: {v}.", "My details ({v}) are attached.",
           "The value {v} was entered by the clerk."]


def make_cases(n: int, seed: int = 0) -> list[tuple[str, set[tuple[str, str]]]]:
    r = random.Random(seed)
    kinds = ["EMAIL", "PHONE", "CARD", "SIN", "IBAN", "IP", "POSTAL_CODE", "DOB"]
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        miss = r.random() < 0.25
        v = _near_miss(kind, r) if miss else _valid(kind, r)
        if kind == "SIN" and miss and r.random() < 0.5:
            v, key = _near_miss("SIN-0", r), "SIN-0-miss"
        else:
            key = kind + ("-miss" if miss else "")
        template = r.choice(TEMPLATES.get(key, GENERIC))
        if kind == "SIN" and not miss and v[0] in "08" and "{v}" in template \
                and not template.startswith(("My SIN", "Social", "NAS")):
            template = "SIN {v}"  # 0 and 8 need their context word
        cases.append((template.format(v=v), set() if miss else {(kind, v)}))
    return cases


def score(cases) -> dict[str, dict[str, float]]:
    tp, fp, fn = Counter(), Counter(), Counter()
    for text, expected in cases:
        got = {(f.label, f.text) for f in detect(text)}
        for item in got & expected:
            tp[item[0]] += 1
        for item in got - expected:
            fp[item[0]] += 1
        for item in expected - got:
            fn[item[0]] += 1
    labels = sorted(set(tp) | set(fp) | set(fn))
    out = {}
    for label in labels + ["ALL"]:
        t = sum(tp.values()) if label == "ALL" else tp[label]
        p_ = sum(fp.values()) if label == "ALL" else fp[label]
        n_ = sum(fn.values()) if label == "ALL" else fn[label]
        out[label] = {"tp": t, "fp": p_, "fn": n_,
                      "precision": t / (t + p_) if t + p_ else 1.0,
                      "recall": t / (t + n_) if t + n_ else 1.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from benchmarks.common import report
    cases = make_cases(args.cases, args.seed)
    result = score(cases)
    rows = [(label, f"P {m['precision']:.3f}  R {m['recall']:.3f}  (tp {m['tp']}, fp {m['fp']}, "
                    f"fn {m['fn']})") for label, m in result.items()]
    report(f"PII detection on {len(cases)} synthetic cases (25% near-misses)", rows,
           {"cases": len(cases), "seed": args.seed, "scores": result}, "pii")


if __name__ == "__main__":
    main()
