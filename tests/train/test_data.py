"""server/train/data.py: validation with line numbers, loss masks on completions only."""
from __future__ import annotations

import pytest

from server.train.data import IGNORE, TrainDataError, load_examples, read_records
from server.train.model import load_tokenizer
from tests.train.conftest import chat, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(default_folder):
    return load_tokenizer(default_folder)


def test_errors_name_every_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        chat("hi", "hello"),                                        # 1 ok
        "{not json",                                                # 2
        "",                                                         # 3 blank: skipped
        {"messages": [{"role": "user", "content": "no answer"}]},   # 4 no assistant turn
        {"prompt": "p"},                                            # 5 completion missing
        {"messages": [{"role": "pirate", "content": "x"}]},         # 6 bad role
        [1, 2],                                                     # 7 not an object
        {"prompt": "p", "completion": "c", "messages": []},         # 8 two formats
        {"text": "x"},                                              # 9 unknown shape
        {"prompt": "p", "completion": "c"},                         # 10 ok
    ])
    with pytest.raises(TrainDataError) as e:
        read_records(path)
    msg = str(e.value)
    assert "7 invalid example(s)" in msg
    for line, words in [(2, "invalid JSON"), (4, "no non-empty assistant"), (5, "'completion' must be a string"),
                        (6, "messages[0].role must be one of"), (7, "expected a JSON object, got list"),
                        (8, "has both 'messages' and 'prompt'"), (9, "got keys ['text']")]:
        (reported,) = [r for r in msg.splitlines() if r.strip().startswith(f"line {line}: ")]
        assert words in reported, (line, reported)
    assert "line 1:" not in msg and "line 3:" not in msg and "line 10:" not in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TrainDataError, match="cannot read"):
        read_records(tmp_path / "absent.jsonl")
    with pytest.raises(TrainDataError, match="no examples"):
        read_records(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


def test_chat_loss_on_assistant_turns_only(tmp_path, tokenizer):
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Name a colour."},
                        {"role": "assistant", "content": "Blue."},
                        {"role": "user", "content": "Another?"},
                        {"role": "assistant", "content": "Green."}]}
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [rec]), tokenizer, 512)
    assert ex.line == 1 and len(ex.input_ids) == len(ex.labels)
    assert ex.input_ids == tokenizer.apply_chat_template(rec["messages"], tokenize=True, return_dict=False)
    learned = tokenizer.decode([t for t in ex.labels if t != IGNORE])
    assert learned == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    # every labelled token is the input token at that position (the model shifts them itself)
    assert all(l in (IGNORE, t) for t, l in zip(ex.input_ids, ex.labels))


def test_prompt_completion_is_raw_text_plus_eos(tmp_path, tokenizer):
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": " 4"}]),
                          tokenizer, 512)
    p = tokenizer("2+2=", add_special_tokens=False)["input_ids"]
    c = tokenizer(" 4", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p + c + [tokenizer.eos_token_id]
    assert ex.labels == [IGNORE] * len(p) + c + [tokenizer.eos_token_id]


def test_truncation_that_removes_every_completion_token_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("short", "ok"), chat("word " * 100, "late answer")])
    with pytest.raises(TrainDataError, match=r"line\(s\) \[2\].*--max-len 40"):
        load_examples(path, tokenizer, 40)
    examples = load_examples(path, tokenizer, 400)
    assert [e.line for e in examples] == [1, 2]
