"""The OpenAI-compatible HTTP server: `build_app(client, settings)`."""

from inhouse.server.app import build_app

# uvicorn's implementations named, not left to what happens to be installed: `ray[serve]` brings
# uvloop and httptools, and "auto" would then parse HTTP with another parser than the one our
# hostile-input tests were written against
UVICORN_IMPL = {"loop": "asyncio", "http": "h11", "ws": "none"}

__all__ = ["UVICORN_IMPL", "build_app"]
