"""The `inhouse` command line."""

from inhouse.cli.app import app, main

__all__ = ["app", "main"]
