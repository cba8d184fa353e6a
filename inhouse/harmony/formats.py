"""Date and time formats, narrowed to what every validator accepts.

llguidance's `date-time` follows RFC 3339 to the letter: a lowercase `t` or `z`, a leap second
`:60`, and 29 February of any year. The validators clients use are stricter (Python's
jsonschema with rfc3339-validator refuses all three; `date` goes through
`datetime.date.fromisoformat`), so an answer the grammar allowed could fail the client's own
check. A string schema with `format` date-time, date or time (and no `pattern` of its own) is
held to a pattern of the common ground instead: uppercase `T` and `Z`, seconds 00-59, days that
exist in every year (no 29 February), years 1000-9999, at most six fractional digits (a weak
model also cannot wander in an endless fraction).
"""

from __future__ import annotations

_YEAR = "[1-9][0-9]{3}"
_MONTH_DAY = ("((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
              "|02-(0[1-9]|1[0-9]|2[0-8]))")
_DATE = f"{_YEAR}-{_MONTH_DAY}"
_TIME = ("([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?"
         "(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$"}


def narrow_formats(schema):
    """A copy of `schema` with the date and time formats of string schemas replaced by
    `PATTERNS` (anything else is kept as it is)."""
    if isinstance(schema, list):
        return [narrow_formats(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: narrow_formats(v) if k not in ("const", "enum", "default", "examples") else v
           for k, v in schema.items()}
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in PATTERNS and "pattern" not in schema:
        del out["format"]
        out["pattern"] = PATTERNS[fmt]
    return out
