"""The OpenAI-compatible HTTP server: `build_app(client, settings)`."""

from inhouse.server.app import build_app

__all__ = ["build_app"]
