"""Text out of an organisation's documents: plain text and Markdown as they are, HTML through
BeautifulSoup (scripts, styles and markup dropped), PDF through pypdf. Lines are wrapped at 80
characters, as the browser tool shows pages, so that a citation's line numbers mean one thing
from indexing to answer."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from inhouse.errors import InhouseError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".log", ".json"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
LINE_WIDTH = 80


class ExtractError(InhouseError):
    pass


def extract_text(name: str, data: bytes) -> tuple[str, str]:
    """(title, text) of a document, by its file name's suffix."""
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf":
        return _pdf(name, data)
    if suffix in HTML_SUFFIXES:
        return _html(name, data)
    if suffix in TEXT_SUFFIXES or not suffix:
        text = _decode(name, data)
        return _first_heading(text) or Path(name).stem, text
    raise ExtractError(f"{name}: unsupported document type {suffix!r} (text, Markdown, HTML "
                       "and PDF are indexed)")


def _decode(name: str, data: bytes) -> str:
    if b"\x00" in data[:4096]:
        raise ExtractError(f"{name}: looks like a binary file, not text")
    return data.decode("utf-8", errors="replace")


def _first_heading(text: str) -> str | None:
    for line in text.splitlines()[:20]:
        if line.startswith("#"):
            return line.lstrip("#").strip()[:200] or None
    return None


def _html(name: str, data: bytes) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for node in soup(["script", "style", "noscript", "template"]):
        node.decompose()
    title = soup.title.get_text(strip=True) if soup.title else ""
    text = soup.get_text("\n")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return title or Path(name).stem, "\n".join(_squeeze_blank(lines))


def _pdf(name: str, data: bytes) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
        meta = reader.metadata
        title = (meta.title if meta and meta.title else "") or Path(name).stem
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise ExtractError(f"{name}: not a readable PDF ({e})") from None
    return str(title), "\n\n".join(pages)


def _squeeze_blank(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return out


def wrap_lines(text: str, width: int = LINE_WIDTH) -> list[str]:
    """Display lines: each text line wrapped at `width`, empty lines kept."""
    out: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        out += textwrap.wrap(line, width=width, replace_whitespace=False,
                             drop_whitespace=False) if line else [""]
    return out
