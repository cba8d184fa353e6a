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


class RequestError(InhouseError):
    """A request refused for a reason its sender can fix or must be told: the HTTP status, the
    parameter at fault and a machine-readable code travel with the message (the server answers in
    OpenAI's error shape; the CLI prints the message)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error",
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind
        self.retry_after_s = retry_after_s
