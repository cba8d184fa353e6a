"""GET /v1/responses/{id}/input_items: a stored response's input items in OpenAI's item shapes,
a page at a time (`after`, `limit`, `order`), as the official client's
`responses.input_items.list` reads them.

Items are stored as they came (a message's content may be a plain string, an item may have no id
or status); `as_item` gives each the fields OpenAI's item types require. An item stored without
an id (responses stored before ids were given at creation) gets one derived from the response id
and its place, the same at every call.
"""

from __future__ import annotations

import hashlib

from inhouse.server.errors import APIError

MAX_LIMIT = 100
ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
             "reasoning": "rs"}


def new_item_id(item: dict, new_id) -> str:
    return new_id(ID_PREFIX.get(item.get("type", "message"), "item"))


def as_item(item: dict, response_id: str, index: int) -> dict:
    """A stored input item -> the item as OpenAI lists it (a new dict)."""
    out = dict(item)
    kind = out.setdefault("type", "message")
    if "id" not in out:
        digest = hashlib.sha256(f"{response_id}:{index}".encode()).hexdigest()[:24]
        out["id"] = f"{ID_PREFIX.get(kind, 'item')}_{digest}"
    if kind in ("message", "function_call", "function_call_output"):
        out.setdefault("status", "completed")
    if kind == "message" and isinstance(out.get("content"), str):
        if out.get("role") == "assistant":
            out["content"] = [{"type": "output_text", "text": out["content"], "annotations": []}]
        else:
            out["content"] = [{"type": "input_text", "text": out["content"]}]
    if kind == "reasoning":
        out.setdefault("summary", [])
    return out


def page(items: list[dict], response_id: str, after: str | None, limit: int,
         order: str) -> dict:
    """One page of the items as OpenAI's list object; `after`: an item id of this list."""
    if not 1 <= limit <= MAX_LIMIT:
        raise APIError(400, f"'limit' must be between 1 and {MAX_LIMIT}, got {limit}",
                       param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"'order' must be 'asc' or 'desc', got {order!r}", param="order")
    listed = [as_item(it, response_id, i) for i, it in enumerate(items)]
    if order == "desc":
        listed.reverse()
    if after is not None:
        ids = [it["id"] for it in listed]
        if after not in ids:
            raise APIError(400, f"no input item '{after}' in response '{response_id}'",
                           param="after")
        listed = listed[ids.index(after) + 1:]
    data = listed[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(listed) > limit}
