"""schemathesis hooks for benchmarks/hostile.py: every generated body names the served model and
asks for few tokens, so that fuzzed requests reach generation instead of stopping at a 404."""

from __future__ import annotations

import os

import schemathesis

LIMITS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "n": 2,
          "top_logprobs": 5}


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = os.environ.get("INHOUSE_SERVED_MODEL", "inhouse-demo")
        for key, most in LIMITS.items():
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                body[key] = max(1, min(body[key], most))
        if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 8
        if "input" in body and "max_output_tokens" not in body:
            body["max_output_tokens"] = 8
        if "previous_response_id" in body:
            body.pop("previous_response_id")  # an unknown id is a 404, not generation
    return body
