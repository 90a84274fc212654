"""Schemathesis fuzzes every operation of the server's own OpenAPI document on a live server, with bodies,
parameters and headers that fit the document and ones that do not. No request may get a 5xx, every answer
must have a status, content type and (for JSON) shape that the document gives, and the server must still
be healthy afterwards.

`schemathesis.pytest.from_fixture` cannot run under pytest 9.2 (which has no `Node._nodeid`), so each
operation's hypothesis strategy is driven here directly."""

import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from duskpool.api.service import Service
from duskpool.engine.runner import LocalEngine
from duskpool.weights.catalog import BUNDLED_NAME
from tests.api.conftest import live_server

pytestmark = pytest.mark.slow

# requests per operation: a valid one may generate up to CONTEXT tokens (seconds); an invalid one is
# refused before any generation
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 50}
CONTEXT = 128  # short: a valid request may generate to the end of it, and every endpoint gets 30 of them
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_url(bundled_model):
    service = Service(LocalEngine.load(bundled_model, CONTEXT), BUNDLED_NAME, bundled_model)
    with live_server(service) as url:
        yield url
    service.close()


def sometimes_the_served_model(values):
    """A random model name is refused with 404 before anything else is looked at; naming the served model
    in some of the requests takes the fuzzer past that, into prompts, sampling and generation."""
    if isinstance(values, dict) and "model" in values:
        return st.sampled_from([values, values | {"model": BUNDLED_NAME}])
    return st.just(values)


@pytest.fixture(scope="module")
def api_schema(fuzzed_url):
    schema = schemathesis.openapi.from_url(f"{fuzzed_url}/openapi.json")
    schema.config.output.sanitization.update(enabled=False)  # it would hide `max_tokens` in reproductions
    schema.hook("flatmap_body")(lambda context, body: sometimes_the_served_model(body))
    schema.hook("flatmap_path_parameters")(lambda context, parameters: sometimes_the_served_model(parameters))
    return schema


def fuzz(operation, mode: GenerationMode, answers: Counter) -> None:
    """Requests to one operation, counted in `answers` by (status, media type); raises on the first answer
    that a check fails (after hypothesis has shrunk the request)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(timeout=60)
        media_type = response.headers.get("content-type", [""])[0].partition(";")[0]  # each header: a list
        answers[response.status_code, media_type] += 1
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        if mode == GenerationMode.POSITIVE:
            raise  # only an operation without parameters has no invalid request to make


def test_fuzzing_finds_no_server_error_and_no_undocumented_answer(api_schema, fuzzed_url, capsys):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    answers: dict[str, Counter] = {}
    seconds: dict[str, float] = {}
    failures = []
    for operation in operations:
        for mode in GenerationMode:
            name = f"{operation.label} ({mode.value})"
            answers[name], started = Counter(), time.monotonic()
            try:
                fuzz(operation, mode, answers[name])
            except (Exception, BaseExceptionGroup) as e:  # every operation is fuzzed; all failures told at the end
                failures.append(f"{name}: {type(e).__name__}: {e}\n" + "\n".join(getattr(e, "__notes__", [])))
            seconds[name] = time.monotonic() - started

    total = sum(answers.values(), Counter())
    statuses = Counter()
    for (status, _), n in total.items():
        statuses[status] += n
    with capsys.disabled():  # the numbers the closing note reports
        print(f"\nschemathesis {schemathesis.__version__}: {total.total()} requests to {len(operations)} operations "
              f"in {sum(seconds.values()):.0f} s; statuses {dict(sorted(statuses.items()))}")
        for name, counts in answers.items():
            shown = ", ".join(f"{status} {media or '-'} x{n}" for (status, media), n in sorted(counts.items()))
            print(f"  {name}: {counts.total()} in {seconds[name]:.1f} s: {shown or 'none possible'}")
    assert not failures, "\n\n".join(failures)

    with httpx.Client(base_url=fuzzed_url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok", "reason": None}
        answer = http.post("/v1/chat/completions", json={
            "model": BUNDLED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
