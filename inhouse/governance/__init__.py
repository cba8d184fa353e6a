"""Governance: the tamper-evident audit log (and, later, PII, privacy operations, keys, policy).

Imports nothing of inhouse above `config`; the server calls into it.
"""
