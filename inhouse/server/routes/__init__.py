"""Thin routers: parse, call a serving object, return."""
