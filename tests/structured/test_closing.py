"""server/structured/closing.py: the token sets, the string state, and the closing rule."""
from __future__ import annotations

import pytest
import torch


def test_closing_tokens_split_string_closers_from_container_closers(hf_tokenizer):
    from server.structured.closing import ClosingTokens
    closing = ClosingTokens.build(hf_tokenizer)
    in_string = {hf_tokenizer.decode([i]) for i in closing.in_string.tolist()}
    outside = {hf_tokenizer.decode([i]) for i in closing.outside.tolist()}
    assert '"' in in_string and all(t.startswith('"') and set(t) <= set('"]}') for t in in_string)
    onward = {hf_tokenizer.decode([i]) for i in closing.string_on.tolist()}
    assert '","' in onward and all(t.startswith('"') and set(t) & set(",:") for t in onward)
    assert {"}", "]"} <= outside and all(t and set(t) <= set("]}") for t in outside)


@pytest.mark.parametrize("text, inside", [('{"a":"b', True), ('{"a":"b"', False), ('{"a":"x\\\\"', False),
                                          ('{"a":"x\\"', True), ('{"a":"x\\"y"', False), ("", False),
                                          ('["}', True)])
def test_in_json_string(text, inside):
    from server.structured.closing import in_json_string
    assert in_json_string(text) is inside


def test_keep_closing_reference():
    from server.structured.closing import keep_closing
    row = torch.tensor([0.5, float("-inf"), 2.0, 1.0, float("-inf")])
    assert keep_closing(row, torch.tensor([1, 3])) and row.tolist() == [float("-inf")] * 3 + [1.0, float("-inf")]
    row = torch.tensor([0.5, float("-inf"), 2.0])
    assert not keep_closing(row, torch.tensor([1])) and row.tolist() == [0.5, float("-inf"), 2.0]


def _masked_row(compiler, hf_tokenizer, schema, text, prefer):
    """A matcher fed `text`, and its next-token logits: 0 where allowed, -inf elsewhere, and
    +5 on the `prefer` tokens (what the model would like to write next)."""
    from server.structured.bitmask import apply_bitmask, fill_bitmasks
    from server.structured.grammar import new_matcher
    from tests.structured.helpers import encode, schema_spec
    m = new_matcher(compiler.compile(schema_spec(schema)))
    for t in encode(hf_tokenizer, text):
        m.consume(t)
    logits = torch.zeros(1, len(hf_tokenizer))
    for p in prefer:
        logits[0, hf_tokenizer.convert_tokens_to_ids(p)] = 5.0
    apply_bitmask(logits, fill_bitmasks([m]))
    return m, logits[0]


def test_close_row_inside_a_free_string_keeps_only_string_closers(compiler, hf_tokenizer):
    from server.structured.closing import close_row
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    m, row = _masked_row(compiler, hf_tokenizer, schema, '{"a":"some text', ["}", "more"])
    close_row(row, m, '{"a":"some text')
    kept = {hf_tokenizer.decode([i]) for i in torch.nonzero(torch.isfinite(row)).flatten().tolist()}
    assert kept and '"' in kept and all(t.startswith('"') for t in kept)   # "}" is string content here
    assert all(set(t) <= set('"]}') for t in kept)     # never `","`: that would open a new member


def test_close_row_outside_strings_closes_the_object_then_ends(compiler, hf_tokenizer):
    from server.structured.closing import close_row
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a"]}
    m, row = _masked_row(compiler, hf_tokenizer, schema, '{"a":12', ["3", ","])
    close_row(row, m, '{"a":12')
    assert hf_tokenizer.decode([int(row.argmax())]) == "}" and torch.isfinite(row).sum() >= 1
    assert all(set(hf_tokenizer.decode([i])) <= set("]}")
               for i in torch.nonzero(torch.isfinite(row)).flatten().tolist())
    m, row = _masked_row(compiler, hf_tokenizer, schema, '{"a":12}', [])
    close_row(row, m, '{"a":12}')
    assert torch.nonzero(torch.isfinite(row)).flatten().tolist() == [hf_tokenizer.eos_token_id]


def test_close_row_looks_one_token_ahead_when_the_string_cannot_close_yet(compiler, hf_tokenizer):
    """A date-time cannot end after fractional seconds; the model prefers more digits; `Z`
    (after which the string may close) is the one token kept."""
    from server.structured.closing import close_row
    schema = {"type": "object", "properties": {"t": {"type": "string", "format": "date-time"}}, "required": ["t"]}
    text = '{"t":"2023-01-18T14:39:56.123'
    m, row = _masked_row(compiler, hf_tokenizer, schema, text, ["4", "5"])
    assert not torch.isfinite(row[m.closing.in_string]).any()        # the string cannot close yet
    close_row(row, m, text)
    kept = torch.nonzero(torch.isfinite(row)).flatten().tolist()
    assert [hf_tokenizer.decode([i]) for i in kept] == ["Z"]
    assert m.num_consumed == len(hf_tokenizer.encode(text, add_special_tokens=False))   # not advanced


def test_lookahead_never_offers_a_backslash(hf_tokenizer):
    """After `\\` the grammar allows `"`, but as an escape: it would not close the string."""
    from server.structured.closing import ClosingTokens
    singles = {hf_tokenizer.decode([i]) for i in ClosingTokens.build(hf_tokenizer).single_char.tolist()}
    assert "Z" in singles and ":" in singles and "\\" not in singles and '"' not in singles


def test_short_value_starts_are_the_vocabularys_own_tokens(hf_tokenizer):
    from server.structured.closing import SHORT_STARTS, ClosingTokens
    starts = [hf_tokenizer.decode([i]) for i in ClosingTokens.build(hf_tokenizer).starts.tolist()]
    assert starts == [t for t in SHORT_STARTS if t in starts] and {'"', "0", "{", "["} <= set(starts)


@pytest.mark.parametrize("schema, text, want", [
    ({"type": "object"}, '{"fur":', '""'),                                   # any value: the empty string
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, '{"n":', "0"),
    ({"type": "object", "properties": {"v": {"type": ["boolean", "null"]}}, "required": ["v"]}, '{"v":', "null"),
    ({"type": "object", "properties": {"xs": {"type": "array"}}, "required": ["xs"]}, '{"xs":', "["),  # no "[]" token here
])
def test_close_row_starts_the_shortest_value_where_one_must_start(compiler, hf_tokenizer, schema, text, want):
    """Where a value must start, the shortest start the grammar allows is the one token kept,
    whatever the model prefers (here a new object, or more text)."""
    from server.structured.closing import close_row
    m, row = _masked_row(compiler, hf_tokenizer, schema, text, ["{", "Ġ1"])
    close_row(row, m, text)
    kept = torch.nonzero(torch.isfinite(row)).flatten().tolist()
    assert [hf_tokenizer.decode([i]) for i in kept] == [want]


def test_close_row_leaves_a_forced_token_alone(compiler, hf_tokenizer):
    """After a key only `:` may come: no closer, no value start; the row is unchanged."""
    from server.structured.closing import close_row
    m, row = _masked_row(compiler, hf_tokenizer, {"type": "object"}, '{"fur"', [])
    before = row.clone()
    close_row(row, m, '{"fur"')
    assert torch.equal(row, before)


def test_close_row_ends_a_number_with_a_comma_not_more_digits(compiler, hf_tokenizer):
    """Mid-number with a required member still to come: `,` (toward it), never another `0`."""
    from server.structured.closing import close_row
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "integer"}},
              "required": ["x", "y"]}
    text = '{"x":1.000'
    m, row = _masked_row(compiler, hf_tokenizer, schema, text, ["0", "00"])
    close_row(row, m, text)
    kept = torch.nonzero(torch.isfinite(row)).flatten().tolist()
    assert [hf_tokenizer.decode([i]) for i in kept] == [","]


def test_close_row_closes_a_date_time_where_only_a_quote_comma_token_may_follow(compiler, hf_tokenizer):
    """After `Z` the string may close, but with a required key to come the grammar allows
    only the one token `","`: the lookahead must count it as closing."""
    from server.structured.closing import close_row
    schema = {"type": "object", "required": ["id"],
              "properties": {"created": {"type": "string", "format": "date-time"}, "id": {"type": "string"}}}
    text = '{"created":"2023-01-21T11:12:12.2000000000'
    m, row = _masked_row(compiler, hf_tokenizer, schema, text, ["0", "00"])
    close_row(row, m, text)
    kept = torch.nonzero(torch.isfinite(row)).flatten().tolist()
    assert [hf_tokenizer.decode([i]) for i in kept] == ["Z"]


def test_lookahead_follows_a_path_of_several_tokens_to_a_closing_point(compiler, hf_tokenizer):
    """A pattern that needs several more characters before the string may close (`mailto:`
    then one more): the rule keeps the first token of a path there, then follows the path;
    one token of lookahead could not reach the closing point."""
    from server.structured.bitmask import apply_bitmask, fill_bitmasks
    from server.structured.closing import close_row
    schema = {"type": "object", "properties": {"to": {"type": "string", "pattern": "^mailto:[a-z]+$"}},
              "required": ["to"]}
    text = '{"to":"'
    m, row = _masked_row(compiler, hf_tokenizer, schema, text, [])
    written = ""
    for _ in range(12):
        close_row(row, m, text + written)
        kept = torch.nonzero(torch.isfinite(row)).flatten().tolist()
        assert len(kept) >= 1
        if any(hf_tokenizer.decode([k]).startswith('"') for k in kept):
            break                                          # the string may close now, and does
        assert len(kept) == 1
        m.consume(kept[0])
        written += hf_tokenizer.decode([kept[0]])
        row = torch.zeros(1, len(hf_tokenizer))
        apply_bitmask(row, fill_bitmasks([m]))
        row = row[0]
    assert written.startswith("mailto:") and len(written) == len("mailto:") + 1, written
