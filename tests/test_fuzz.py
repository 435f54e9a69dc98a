"""schemathesis against the server's own /openapi.json (a bounded run): no 5xx, and every answer
has a documented status, content type and body schema. Valid and invalid bodies are generated."""
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance)

pytest.register_assert_rewrite("tests.serve_helpers")
from tests.serve_helpers import free_port, launch, stop, wait_http

pytest_plugins = ["tests.serve_helpers"]               # the shared `servers` fixture (for its checkpoint)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))    # per operation and mode; raise it for a longer run
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_server(servers, tmp_path_factory):
    """Answers stay short (max_new_tokens <= 8), so hundreds of generated requests take seconds."""
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    port = free_port()
    proc = launch(["--checkpoint", str(servers.ckpt), "--port", str(port), "--max-new-tokens", "8",
                   "--max-prompt-chars", "300", "--max-batch", "4", "--max-queue", "16"], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base, proc, log, ready=True)
        yield base, proc, log
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server[0] + "/openapi.json")


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
OPERATIONS = [("GET", "/health", POSITIVE), ("GET", "/v1/models", POSITIVE)] + [   # GETs take no input to break
    ("POST", path, mode) for path in ("/v1/generate", "/v1/generate-multipart", "/v1/chat/completions")
    for mode in (POSITIVE, NEGATIVE)]


@pytest.mark.parametrize("method, path, mode", OPERATIONS, ids=[f"{p}-{m.value}" for _, p, m in OPERATIONS])
def test_api_answers_match_the_documented_schema(api_schema, method, path, mode):
    """(schemathesis' own pytest plugin does not run under pytest 9, so hypothesis drives it here.)"""
    op = api_schema[path][method]
    # A form has no types: an "invalid" array value becomes a repeated field, or no field at all
    # when empty, so a form request is not judged on whether "invalid" data was refused.
    checks = [c for c in CHECKS if not (path.endswith("multipart") and c is negative_data_rejection)]
    examples = []

    @given(op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        examples.append(case.call_and_validate(checks=checks, timeout=30).status_code)
    run()
    assert examples and all(code < 500 for code in examples)


def test_schema_documents_bodies_and_errors(fuzz_server):
    base, proc, log = fuzz_server
    spec = httpx.get(base + "/openapi.json", timeout=10).json()
    for path in ("/v1/generate", "/v1/generate-multipart", "/v1/chat/completions"):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        assert {"200", "400", "413", "415", "503"} <= set(op["responses"])
    assert proc.poll() is None and httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_new_tokens": 2, "temperature": 1.4952198533406786e-83},   # logits / T overflowed to NaN
    {"prompt": "x", "max_new_tokens": 2, "temperature": 1e-4, "seed": 1},
])
def test_what_the_fuzzer_found_stays_fixed(fuzz_server, body):
    r = httpx.post(fuzz_server[0] + "/v1/generate", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
