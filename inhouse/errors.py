"""Errors that carry a message meant for a person.

Every error raised for bad input (a missing file, a corrupt checkpoint, an inconsistent config)
is an `InhouseError`; the CLI prints its message as one line and exits non-zero.
"""


class InhouseError(Exception):
    """Base class: the message alone must tell the user what is wrong and, if possible, what to do."""


class ConfigError(InhouseError):
    """A config.json field is unknown, missing, of the wrong type, or inconsistent with another."""


class CheckpointError(InhouseError):
    """A checkpoint directory or file is missing, truncated, of another architecture, or misshaped."""


class HarmonyUnavailable(InhouseError):
    """The tokenizer's vocabulary or the openai-harmony package cannot be set up offline."""
