"""Matcher: one request's position in its grammar (wraps llguidance.LLMatcher).

A Matcher is what the engine sees as a request's Constraint (server/engine/request.py):
    m.fill_masks([m, ...])   -> int32 (n, W) allowed tokens for the next step, in parallel
    m.apply_masks(logits, masks)  refused tokens -> -inf, in place   (server/structured/bitmask.py)
    m.close(row, text)       the closing budget's rule on one masked row (server/structured/closing.py)
    m.repeating(text)        the output just repeated a tool call: the closing rule turns on
    m.consume(token_id)      after each sampled token
    m.is_stopped()           True once the grammar is complete: finish with reason "stop"
The engine calls these methods and imports nothing from here, so it runs without llguidance.

A Matcher only ever sees tokens its mask allowed, so a refused token is a bug in the
caller: consume() raises GrammarError naming the token and llguidance's reason rather than
letting the request go on unconstrained. For n > 1 choices call new_matcher() n times on
the same CompiledGrammar (compiled once), or fork() a matcher to copy its current state.
"""
from __future__ import annotations

import llguidance

import torch

from server.errors import GrammarError
from server.structured.bitmask import apply_bitmask, fill_bitmasks
from server.structured.closing import ClosingTokens, close_row
from server.structured.spec import ConstraintSpec
from server.structured.tools import CALL_RESERVE, close_tool_row, repeats_a_call


class Matcher:
    def __init__(self, inner: llguidance.LLMatcher, vocab_size: int, eos_token_id: int,
                 close_within: int | None = 0, closing: ClosingTokens | None = None,
                 tool_calls: bool = False, spec: ConstraintSpec | None = None) -> None:
        self._inner = inner
        self.spec = spec                      # what it was compiled from (a remote replica rebuilds it)
        self.vocab_size = vocab_size          # bits in one mask row (the tokenizer's vocabulary)
        self.eos_token_id = eos_token_id
        # ConstraintSpec.close_within: the engine's closing budget (None until the API resolves it)
        self.close_within = close_within
        self.closing = closing                # the token sets that budget uses (structured/closing.py)
        self.tool_calls = tool_calls          # a tool-call grammar: the closing rule reads calls
        # a derived closing budget (api/requests.py) leaves room for a call's tags as well
        self.close_reserve = CALL_RESERVE if tool_calls else 0
        self.num_consumed = 0
        # the closing rule's lookahead path: (num_consumed it expects, tokens left), or None
        self.closing_plan: tuple[int, list[int]] | None = None

    @property
    def llmatcher(self) -> llguidance.LLMatcher:
        """The wrapped llguidance matcher (for batched mask filling)."""
        return self._inner

    def fill_masks(self, batch: list[Matcher]) -> torch.Tensor:
        """The next-token bitmasks of batch (this matcher among them): int32 (n, ceil(V/32))."""
        return fill_bitmasks(batch)

    def apply_masks(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """logits (n, V) of the batch's rows, in place: tokens masks refuse -> -inf."""
        apply_bitmask(logits, masks)

    def close(self, logits: torch.Tensor, text: str) -> None:
        """Inside the closing budget: steer the row's masked logits (V,) toward ending the value;
        text: the output so far."""
        if self.tool_calls:
            close_tool_row(logits, self, text)
        else:
            close_row(logits, self, text)

    def repeating(self, text: str) -> bool:
        """Whether the output (text so far) has just repeated a unit of this grammar: a tool
        call identical to an earlier one. The engine then turns the closing rule on."""
        return self.tool_calls and repeats_a_call(text)

    def consume(self, token_id: int) -> None:
        """Advance by one sampled token; GrammarError if the grammar does not allow it."""
        if not self._inner.consume_token(token_id):
            raise GrammarError(
                f"token {token_id} is not allowed by the grammar after {self.num_consumed} tokens: "
                f"{self._inner.get_error() or 'refused'}")
        self.num_consumed += 1

    def is_stopped(self) -> bool:
        """The grammar is complete: nothing but EOS may follow (or an earlier error)."""
        return self._inner.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed now)."""
        return self._inner.is_accepting()

    def fork(self) -> Matcher:
        """An independent copy at the same position (compiled grammar shared, no recompile)."""
        twin = Matcher(self._inner.deep_copy(), self.vocab_size, self.eos_token_id, self.close_within,
                       self.closing, self.tool_calls)
        twin.num_consumed = self.num_consumed
        return twin

    def allowed_token_ids(self) -> list[int]:
        """The tokens allowed next (a readable, slow form of one mask row; for tests and debugging)."""
        bits = self._inner.compute_bitmask()                     # bytes, 1 bit per token, LSB first
        return [i for i in range(self.vocab_size) if bits[i >> 3] >> (i & 7) & 1]
