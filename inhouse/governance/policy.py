"""A policy the organisation writes itself, evaluated safeguard-style (gpt-oss-safeguard): the
policy is the developer message (instructions, definitions, criteria, examples), the content to
classify is the user message, and the answer is the verdict in the format the policy asks for.

inhouse asks for one format and holds the answer to it with a grammar, so a verdict always
parses: `{"violation": 0|1, "category": "NAME"|null, "rationale": "..."}`. A policy file may
declare its categories on a line `Categories: a, b, c`; then `category` is one of them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from inhouse.errors import ConfigError

MAX_POLICY_CHARS = 64 << 10
_CATEGORIES = re.compile(r"^\s*categories\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

OUTPUT_FORMAT = """
# Output format

Answer with one JSON object and nothing else:
{"violation": 1 if the content violates the policy else 0, "category": the violated category (null if none), "rationale": one or two sentences}"""


@dataclass(frozen=True)
class Policy:
    text: str
    categories: tuple[str, ...]  # empty: any name
    sha256: str
    name: str

    @classmethod
    def load(cls, path: Path) -> Policy:
        if not path.is_file():
            raise ConfigError(f"no policy file at {path}")
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        return cls.from_text(text, path.name)

    @classmethod
    def from_text(cls, text: str, name: str = "policy") -> Policy:
        if not text:
            raise ConfigError("the policy is empty")
        if len(text) > MAX_POLICY_CHARS:
            raise ConfigError(f"the policy is longer than {MAX_POLICY_CHARS} characters")
        cats: tuple[str, ...] = ()
        m = _CATEGORIES.search(text)
        if m:
            cats = tuple(dict.fromkeys(c.strip() for c in m.group(1).split(",") if c.strip()))
            bad = [c for c in cats if not _NAME.match(c)]
            if bad:
                raise ConfigError(f"policy category {bad[0]!r}: use letters, digits, '_', '-', '.'")
        return cls(text, cats, hashlib.sha256(text.encode()).hexdigest(), name)

    def instructions(self) -> str:
        """The developer message: the policy, then the output format inhouse enforces."""
        return self.text + "\n" + OUTPUT_FORMAT

    def verdict_schema(self) -> dict:
        """The guard's answer. With declared categories a violation names one of them and no
        violation names none: the grammar then cannot give a violation without its category
        (which `block` answers name) nor a category to a pass."""
        def verdict(violation: dict, category: dict) -> dict:
            return {"type": "object", "additionalProperties": False,
                    "required": ["violation", "category", "rationale"],
                    "properties": {"violation": violation, "category": category,
                                   "rationale": {"type": "string", "maxLength": 600}}}

        if not self.categories:
            return verdict({"enum": [0, 1]}, {"type": ["string", "null"], "maxLength": 64})
        return {"anyOf": [verdict({"const": 1}, {"enum": list(self.categories)}),
                          verdict({"const": 0}, {"const": None})]}


@dataclass(frozen=True)
class Verdict:
    violation: bool
    category: str | None
    rationale: str
    complete: bool = True  # False: the guard's answer was cut (counted as a violation)

    @property
    def rationale_sha256(self) -> str:
        return hashlib.sha256(self.rationale.encode("utf-8", "surrogatepass")).hexdigest()
