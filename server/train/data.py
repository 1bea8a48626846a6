"""Training data: a JSONL file of examples, validated up front, tokenized with loss masks.

Each line is one JSON object, either
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
rendered with the model's chat template, loss on the assistant turns only (their content
and the end-of-turn token), or
    {"prompt": str, "completion": str}
used as raw text (no chat template), loss on the completion and the EOS token after it.
Blank lines are skipped. Every problem is reported with its line number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from server.errors import LoraplexError

ROLES = ("system", "user", "assistant")
IGNORE = -100          # label of a token that carries no loss (PyTorch cross-entropy's ignore_index)
MAX_REPORTED = 10      # problems listed in one error before "... and N more"


class TrainDataError(LoraplexError):
    """The training data file is missing, malformed, or has no trainable tokens."""


@dataclass(frozen=True)
class Example:
    line: int                 # 1-based line in the JSONL file
    input_ids: list[int]
    labels: list[int]         # input_ids where the loss applies, IGNORE elsewhere


def _check_record(obj: object) -> str | None:
    """None if obj is a valid example, else what is wrong with it."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    has_chat = "messages" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_chat and has_pair:
        return "has both 'messages' and 'prompt'/'completion'; use one format per line"
    if has_chat:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) - {"role", "content"}:
                return f"messages[{i}] must be an object with only 'role' and 'content'"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}].content must be a string"
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            return "no non-empty assistant message to learn from"
        return None
    if has_pair:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                return f"'{key}' must be a string"
        if not obj["completion"]:
            return "'completion' is empty"
        return None
    return f"expected 'messages' or 'prompt'+'completion', got keys {sorted(obj)}"


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Parse and validate every line; raise one TrainDataError listing the bad lines."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainDataError(f"cannot read training data {str(p)!r}: {e}") from e
    records: list[tuple[int, dict]] = []
    problems: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        problem = _check_record(obj)
        if problem is not None:
            problems.append(f"line {n}: {problem}")
        else:
            records.append((n, obj))
    if problems:
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise TrainDataError(f"{p}: {len(problems)} invalid example(s):\n  " + "\n  ".join(shown) + tail)
    if not records:
        raise TrainDataError(f"{p}: no examples (the file is empty)")
    return records


def _chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens of the rendered chat, labelled on each assistant turn's characters."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []  # character ranges [start, end) carrying the loss
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            # the loss mask needs each turn rendered as a prefix of the whole conversation
            raise TrainDataError(f"the model's chat template does not render messages[:{i + 1}] "
                                 "as a prefix of the conversation; use prompt/completion pairs")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE
              for t, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _pair_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(p) + list(c), [IGNORE] * len(p) + list(c)


def load_examples(path: str | Path, tokenizer, max_len: int) -> list[Example]:
    """Validated, tokenized examples, each truncated to max_len tokens."""
    examples: list[Example] = []
    empty: list[int] = []
    for n, obj in read_records(path):
        if "messages" in obj:
            ids, labels = _chat_example(tokenizer, obj["messages"])
        else:
            ids, labels = _pair_example(tokenizer, obj["prompt"], obj["completion"])
        ids, labels = ids[:max_len], labels[:max_len]
        if all(t == IGNORE for t in labels):
            empty.append(n)
            continue
        examples.append(Example(n, ids, labels))
    if empty:
        raise TrainDataError(
            f"{path}: line(s) {empty[:MAX_REPORTED]} have no completion tokens within --max-len {max_len}")
    return examples
