"""Property-based requests generated from the server's own OpenAPI schema (schemathesis):
whatever they contain, the server answers without a 5xx and in the documented shape."""

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from inhouse.config import ServerSettings  # noqa: E402
from inhouse.server import build_app  # noqa: E402
from tests.server_utils import ScriptedEngine  # noqa: E402

APP = build_app(ScriptedEngine("<|channel|>final<|message|>ok<|return|>"),
                ServerSettings(model_name="tiny-test"))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[schemathesis.checks.not_a_server_error])
