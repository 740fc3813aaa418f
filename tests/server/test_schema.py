"""Schemathesis against /openapi.json of the live server: no 5xx and no response that breaks the schema.

Positive and negative (schema-violating) requests are generated for every operation;
each response is checked for server errors, documented status codes, content types
and headers, the documented response schema, and (for invalid input) a 4xx.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.negative_data_rejection,
]


# A schema-violating body may also be refused for its size (413, the server's --max-body-bytes).
NEGATIVE_EXPECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


@pytest.fixture(scope="module")
def api_schema(live_server):
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": NEGATIVE_EXPECTED}}}
    )
    # with --api-key and without --public-docs the schema itself needs the key
    return schemathesis.openapi.from_url(live_server.url + "/openapi.json", config=config, headers=live_server.headers)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_schema_holds(case, live_server):
    case.call_and_validate(headers=live_server.headers, checks=CHECKS, timeout=60)
