"""Pydantic models of the wire formats (requests); responses are built as plain dicts."""
