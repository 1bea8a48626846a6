import json

import pytest

from loadtest.sse import SSEDecoder, decode_lines, parse_chunk


def test_events_split_on_blank_lines_and_join_multiline_data():
    lines = [": keep-alive", "event: message", "data: {\"a\":", "data: 1}", "", "id: 7", "data:[DONE]", ""]
    assert decode_lines(lines) == ['{"a":\n1}', "[DONE]"]


def test_crlf_and_missing_final_blank_line():
    assert decode_lines(["data: x\r\n", "\r\n", "data: y"]) == ["x", "y"]


def test_incremental_feed_returns_data_only_at_event_end():
    d = SSEDecoder()
    assert d.feed("data: hello") is None
    assert d.feed("") == "hello"
    assert d.feed("") is None


def test_parse_chunk_content_finish_usage():
    c = parse_chunk(json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}))
    assert (c.content, c.finish_reason, c.usage, c.error) == ("Hi", None, None, None)
    c = parse_chunk(json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}))
    assert c.content == "" and c.usage["completion_tokens"] == 3
    c = parse_chunk(json.dumps({"choices": [{"delta": {"role": "assistant", "content": None},
                                             "finish_reason": "length"}]}))
    assert c.content == "" and c.finish_reason == "length"


def test_parse_chunk_error_and_garbage():
    assert parse_chunk('{"error": {"message": "boom", "type": "x"}}').error == "boom"
    with pytest.raises(ValueError, match="not JSON"):
        parse_chunk("{oops")
