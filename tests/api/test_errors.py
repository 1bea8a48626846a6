"""server/api/errors.py: typed project errors map to OpenAI statuses, types, params and codes."""
import pytest

from server.api import errors
from server.config import ConfigError
from server.engine.request import SamplingParams, SamplingParamsError
from server.errors import AdapterError, GrammarError, ModelLoadError, PromptTooLongError


def _sampling_error() -> SamplingParamsError:
    try:
        SamplingParams(top_p=0.0)
    except SamplingParamsError as e:
        return e
    raise AssertionError("SamplingParams accepted top_p=0")


@pytest.mark.parametrize("exc, status, type_, param, code", [
    (_sampling_error(), 400, "invalid_request_error", "top_p", None),
    (GrammarError("JSON schema 'x' is not supported"), 400, "invalid_request_error", "response_format",
     "invalid_grammar"),
    (PromptTooLongError(5000, 1024), 413, "invalid_request_error", "messages", "context_length_exceeded"),
    (AdapterError("rank 64 > max_lora_rank 16"), 400, "invalid_request_error", "lora_path", "invalid_adapter"),
    (ConfigError("bad"), 400, "invalid_request_error", None, None),
    (errors.queue_full(7), 429, "rate_limit_error", None, "queue_full"),
    (errors.model_not_found("x"), 404, "invalid_request_error", "model", "model_not_found"),
])
def test_mapping(exc, status, type_, param, code):
    err = errors.from_exception(exc)
    assert (err.status, err.type, err.param, err.code) == (status, type_, param, code)
    body = err.body()["error"]
    assert body["message"] == str(exc) or isinstance(exc, errors.APIError)
    assert set(body) == {"message", "type", "param", "code"}


def test_prompt_too_long_message_names_the_numbers():
    assert errors.from_exception(PromptTooLongError(5000, 1024)).message == \
        "prompt has 5000 tokens; this model's context is 1024 tokens"


def test_unexpected_errors_are_not_mapped():
    assert errors.from_exception(RuntimeError("x")) is None
    assert errors.from_exception(ModelLoadError("x")) is None   # a server fault, not the client's


def test_queue_full_carries_retry_after():
    assert errors.queue_full(3, retry_after=2).headers == {"Retry-After": "2"}


def test_internal_error_hides_the_exception(caplog):
    err = errors.internal_error(RuntimeError("db password is hunter2"), "rid-9")
    assert err.status == 500 and "hunter2" not in err.message and "rid-9" in err.message
    assert "rid-9" in caplog.text
