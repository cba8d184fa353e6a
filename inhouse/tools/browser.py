"""The `browser` tool over the organisation's document index: `search`, `open` and `find`, shown
the way gpt-oss was trained to read pages (OpenAI's reference browser): a cursor per page,
`L{n}: ` line numbers, links as `【{id}†{title}†{source}】`, and citations back as
`【{cursor}†L{a}-L{b}】`, which `citations` turns into `url_citation` annotations.

It never touches the network: `open` of anything but an indexed document is an error the model
reads. One `Browser` per turn (its pages are the turn's cursors), one tenant's documents only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from inhouse.tools.documents import DocumentStore

URL_PREFIX = "inhouse://documents/"
VIEW_CHARS = 4000  # about the reference's 1,024-token view
CITATION = re.compile(r"【(?P<cursor>\d+)†L(?P<a>\d+)(?:-L(?P<b>\d+))?】")


class ToolUsageError(Exception):
    """A call the model got wrong; it reads the message and may try again."""


@dataclass
class Page:
    url: str
    title: str
    lines: list[str]
    links: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (doc id, line)
    is_result_list: bool = False


@dataclass(frozen=True)
class Citation:
    start: int  # character offsets of the mark in the answer
    end: int
    url: str  # the document, with its lines: inhouse://documents/doc_...#L3-L7
    title: str
    mark: str  # the mark itself, as written in the answer


class Browser:
    def __init__(self, store: DocumentStore, tenant: str, max_results: int = 8,
                 collections: tuple[str, ...] | None = None) -> None:
        self.store, self.tenant = store, tenant
        self.max_results, self.collections = max_results, collections
        self.pages: list[Page] = []

    def call(self, function: str, arguments: str) -> str:
        """Run `browser.FUNCTION` with the model's JSON arguments; the text the model reads.
        Errors of use come back as text too (the model may correct itself)."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(args, dict):
                raise ToolUsageError("the arguments must be a JSON object")
            if function == "search":
                return self.search(str(args.get("query", "")), _int(args, "topn", 10))
            if function == "open":
                return self.open(args.get("id", -1), _int(args, "cursor", -1),
                                 _int(args, "loc", -1), _int(args, "num_lines", -1))
            if function == "find":
                return self.find(str(args.get("pattern", "")), _int(args, "cursor", -1))
            raise ToolUsageError(f"unknown function browser.{function}: use search, open or find")
        except json.JSONDecodeError:
            return json.dumps({"error": "Invalid function arguments: not JSON"})
        except ToolUsageError as e:
            return json.dumps({"error": str(e)})

    # ---- the three functions ------------------------------------------------------------------
    def search(self, query: str, topn: int = 10) -> str:
        if not query.strip():
            raise ToolUsageError("search needs a non-empty `query`")
        hits = self.store.search(self.tenant, query, min(max(topn, 1), self.max_results),
                                 self.collections)
        lines, links = ["# Search Results", ""], {}
        for i, h in enumerate(hits):
            links[i] = (h.info.id, h.line_start)
            lines.append(f"  * 【{i}†{h.info.title}†{h.info.collection}】 "
                         + " ".join(h.snippet.split())[:200])
        if not hits:
            lines.append(f"No results for `{query}` in the organisation's documents.")
        return self._show(self._add(Page("", query, lines, links, True)), 0, -1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1,
             num_lines: int = -1) -> str:
        if isinstance(id, str):
            page = self._document(id.removeprefix(URL_PREFIX).split("#")[0], id)
            return self._show(self._add(page), max(loc, 0), num_lines)
        page = self._page(cursor)
        if not isinstance(id, int) or isinstance(id, bool):
            raise ToolUsageError("`id` must be a link number or a document id")
        if id < 0:  # scroll the current page
            return self._show(self._add(page), max(loc, 0), num_lines)
        if id not in page.links:
            raise ToolUsageError(f"Invalid link id `{id}`.")
        doc_id, line = page.links[id]
        target = self._document(doc_id, doc_id)
        if loc < 0:
            loc = max(line - 4, 0) if line > 4 else 0
        return self._show(self._add(target), loc, num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        page = self._page(cursor)
        if page.is_result_list:
            raise ToolUsageError("Cannot run `find` on search results page or find results page")
        if not pattern:
            raise ToolUsageError("find needs a `pattern`")
        wanted, chunks, links, i = pattern.lower(), [], {}, 0
        doc_id = page.url.removeprefix(URL_PREFIX)
        while i < len(page.lines) and len(chunks) < 50:
            if wanted in page.lines[i].lower():
                links[len(chunks)] = (doc_id, i)
                chunks.append(f"# 【{len(chunks)}†match at L{i}】\n"
                              + "\n".join(page.lines[i:i + 4]))
                i += 4
            else:
                i += 1
        text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
        title = f"Find results for text: `{pattern}` in `{page.title}`"
        return self._show(self._add(Page(f"{page.url}/find", title, text.split("\n"), links,
                                         True)), 0, -1)

    # ---- pages ----------------------------------------------------------------------------------
    def _document(self, doc_id: str, asked: str) -> Page:
        doc = self.store.get(self.tenant, doc_id)
        if doc is None:
            raise ToolUsageError(f"Cannot open `{asked[:200]}`: only the organisation's indexed "
                                 "documents can be opened (there is no web access); search first")
        return Page(URL_PREFIX + doc.info.id, doc.info.title, doc.lines)

    def _add(self, page: Page) -> int:
        self.pages.append(page)
        return len(self.pages) - 1

    def _page(self, cursor: int) -> Page:
        if not self.pages:
            raise ToolUsageError("No page is open yet: search first")
        if cursor < 0:
            return self.pages[-1]
        if cursor >= len(self.pages):
            raise ToolUsageError(f"Invalid cursor `{cursor}`")
        return self.pages[cursor]

    def _show(self, cursor: int, loc: int, num_lines: int) -> str:
        page = self.pages[cursor]
        total = len(page.lines)
        if loc >= max(total, 1):
            raise ToolUsageError(f"Invalid location parameter: `{loc}`. Cannot exceed page "
                                 f"maximum of {total - 1}.")
        end = min(loc + num_lines, total) if num_lines > 0 else _fit(page.lines, loc)
        body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(loc, end))
        header = page.title + (f" ({page.url})" if page.url else "")
        return f"[{cursor}] {header}\n**viewing lines [{loc} - {end - 1}] of {total - 1}**\n\n{body}"

    def sources(self, page: Page) -> tuple[str, ...]:
        """The documents a result page links to, as URLs, in link order."""
        return tuple(dict.fromkeys(URL_PREFIX + doc for _, (doc, _) in sorted(page.links.items())))

    # ---- answers --------------------------------------------------------------------------------
    def citations(self, answer: str) -> list[Citation]:
        """The answer's `【cursor†La-Lb】` marks that point at an opened document."""
        out = []
        for m in CITATION.finditer(answer):
            cursor = int(m.group("cursor"))
            if cursor >= len(self.pages) or not self.pages[cursor].url.startswith(URL_PREFIX):
                continue
            page = self.pages[cursor]
            if "/find" in page.url:
                continue
            a = int(m.group("a"))
            b = int(m.group("b") or a)
            out.append(Citation(m.start(), m.end(), f"{page.url}#L{a}-L{b}", page.title,
                                m.group(0)))
        return out


def _fit(lines: list[str], loc: int) -> int:
    used, end = 0, loc
    while end < len(lines) and (used == 0 or used + len(lines[end]) + 8 <= VIEW_CHARS):
        used += len(lines[end]) + 8
        end += 1
    return end


def _int(args: dict, name: str, default: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolUsageError(f"`{name}` must be a number")
    return int(value)
