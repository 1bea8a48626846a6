"""Tokenizer: the model folder's HF fast tokenizer, its chat template, and streaming text.

`Tokenizer` wraps the HF tokenizer without ever mutating it. `IncrementalDetokenizer`
turns a growing list of token ids into text deltas that are safe to stream: text is
emitted only once it is stable (no dangling half of a multi-byte UTF-8 character, no
merge still pending, vLLM-style prefix/read offsets), and stop strings are never
emitted, not even in part: text that could be the start of one is held back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from server.errors import ModelLoadError

# Tokens of context decoded before the unread ones, so merges and spaces render as in a full decode.
_PREFIX_TOKENS = 5
_REPLACEMENT = "\ufffd"


def _ids_of(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class Tokenizer:
    def __init__(self, model_dir: str | os.PathLike) -> None:
        from transformers import AutoTokenizer
        self.path = Path(model_dir)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load a tokenizer from {self.path}: {e}") from e
        self.eos_token_ids: set[int] = _ids_of(self.hf.eos_token_id) | self._generation_eos()
        self.vocab_size = len(self.hf)
        # The most characters one token stands for (byte-level and SentencePiece vocabularies
        # spell each token with at least as many characters as it decodes to).
        self.max_token_chars = max((len(t) for t in self.hf.get_vocab()), default=1)

    def _generation_eos(self) -> set[int]:
        gen = self.path / "generation_config.json"
        if not gen.is_file():
            return set()
        try:
            return _ids_of(json.loads(gen.read_text()).get("eos_token_id"))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{gen} is not valid: {e}") from e

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (the tokenizer's own special tokens, e.g. BOS, are added)."""
        return list(self.hf.encode(text))

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and tools, for a template that takes them) -> ids through the model's
        chat template, ready for the assistant turn."""
        text = self.apply_chat_template(messages, tools)
        return list(self.hf.encode(text, add_special_tokens=False))

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (Qwen's, Llama 3.1's, ...)."""
        template = getattr(self.hf, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise ModelLoadError(f"the tokenizer in {self.path} has no chat template")
        return self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


class StopStringBuffer:
    """Holds back text that could begin a stop string; cuts the output at the first stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """New stable text -> (text safe to emit, whether a stop string was reached)."""
        if not self.stop:
            return text, False
        candidate = self.pending + text
        cut = min((i for i in (candidate.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return candidate[:cut], True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(candidate)), hold, -1):
                if candidate.endswith(s[:k]):
                    hold = k
                    break
        self.pending = candidate[len(candidate) - hold:] if hold else ""
        return candidate[:len(candidate) - hold], False

    def flush(self) -> str:
        """The held-back text, when the request ends for a reason other than a stop string."""
        text, self.pending = self.pending, ""
        return text


class IncrementalDetokenizer:
    """Token ids of one request -> stable text deltas, with stop strings handled."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_PREFIX_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stops = StopStringBuffer(stop)
        self.stopped = False
        self._deltas: list[str] = []   # every stable delta so far, stop strings included

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        """Append generated ids; return the text that became stable and may be emitted."""
        assert not self.stopped, "push after a stop string"
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # an incomplete UTF-8 sequence or a pending merge: wait for more tokens
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._trim()
        self._deltas.append(delta)
        text, self.stopped = self.stops.push(delta)
        return text

    @property
    def text(self) -> str:
        """The output decoded so far (stop strings included), joined when asked for."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def _trim(self) -> None:
        """Drop ids before the prefix window so decoding stays O(window), not O(output)."""
        if self.prefix_offset > _PREFIX_TOKENS:
            drop = self.prefix_offset - _PREFIX_TOKENS
            del self.ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop

    def flush(self) -> str:
        """Remaining text at the end of the request (unstable tail + held-back stop prefix)."""
        if self.stopped:
            return ""
        tail = ""
        if self.read_offset < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full_text = self._decode(self.ids[self.prefix_offset:])
            tail = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset = len(self.ids)
        text, self.stopped = self.stops.push(tail)
        return text if self.stopped else text + self.stops.flush()
