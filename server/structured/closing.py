"""Closing within the budget (ConstraintSpec.close_within): end a JSON value before max_tokens.

Inside a request's closing budget the engine calls `close_row` on that row's masked logits
(the token sets are built once per tokenizer by the GrammarCompiler and travel with each Matcher):

1. Whenever the grammar allows a token that closes the open string (`"`, `"}`, `","` ...) or,
   outside strings, closes arrays and objects (`]`, `}` ...) or ends the output (EOS), only
   those tokens stay.
2. Inside a string where none is allowed yet (a `format` or `pattern` not yet met), one token
   of lookahead: the most likely allowed one-character token after which the string may
   close (e.g. `Z` ending a date-time, `:` completing a URI scheme) is the only one kept.
3. Outside strings, where a value (or a key) must start, right after `:`, `[` or `,`: the
   shortest start the grammar allows (`""`, then `"`, `0`, `null`, `false`, `true`, `[]`,
   `{}`, `[`, `{`) is the only token kept, so the value ends in a token or two instead of
   opening new structures. Elsewhere outside strings (after a number's digits, say), a `,`
   the grammar allows is kept: the next required member rather than more digits.
4. Otherwise the row is left as it is: the model goes on (a `:` to write; a required key's
   next character is chosen by rule 2).

Compact JSON has no raw `"` inside a string, so the text so far says whether the output is
inside a string (`in_json_string`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CLOSING_CHARS = frozenset('"]}')
STRUCTURAL_CHARS = frozenset('"]},:')        # what may follow a string's closing quote in one token
LOOKAHEAD_CANDIDATES = 64
SHORT_STARTS = ('""', '"', "0", "null", "false", "true", "[]", "{}", "[", "{")   # preferred first
VALUE_START_AFTER = frozenset(":[,")       # compact JSON: a value or a key starts after these


@dataclass(frozen=True)
class ClosingTokens:
    """Token sets, built once per tokenizer (about 0.2 s for a 49k vocabulary).

    in_string:   text is `"` then only closing characters: ends the open string.
    string_on:   text is `"` then structural characters with a `,` or `:` (`","`, `":`):
                 ends the string and goes on to the next member. Where a required key
                 follows, the grammar may allow only such a token; they are used only when
                 no `in_string` token is allowed, so a string never closes into a new member
                 when it could close the value.
    outside:     text is only `]` and `}`: closes arrays and objects. Inside a string these
                 are plain characters, which is why the two sets are kept apart.
    single_char: text is one character other than `"` and `\\`: the lookahead's candidates
                 (after a backslash a `"` is allowed but escaped, not closing).
    starts:      one token for each of SHORT_STARTS the vocabulary has, in that order.
    comma:       the `,` token (empty if the vocabulary has none).
    """
    in_string: torch.Tensor     # (k1,) int64
    string_on: torch.Tensor     # (k5,) int64
    outside: torch.Tensor       # (k2,) int64
    single_char: torch.Tensor   # (k3,) int64
    starts: torch.Tensor        # (k4,) int64, most preferred first
    comma: torch.Tensor         # (0 or 1,) int64

    @staticmethod
    def build(hf_tokenizer) -> "ClosingTokens":
        texts = [(i, hf_tokenizer.decode([i])) for i in range(len(hf_tokenizer))]
        in_string = [i for i, t in texts if t.startswith('"') and set(t) <= CLOSING_CHARS]
        string_on = [i for i, t in texts if t.startswith('"') and set(t) <= STRUCTURAL_CHARS
                     and not set(t) <= CLOSING_CHARS]
        outside = [i for i, t in texts if t and set(t) <= CLOSING_CHARS - {'"'}]
        single = [i for i, t in texts if len(t) == 1 and t not in '"\\']   # a backslash would escape the quote
        first: dict[str, int] = {}
        for i, t in texts:
            first.setdefault(t, i)
        starts = [first[t] for t in SHORT_STARTS if t in first]
        comma = [first[","]] if "," in first else []
        return ClosingTokens(*(torch.tensor(v, dtype=torch.int64)
                               for v in (in_string, string_on, outside, single, starts, comma)))


def in_json_string(text: str) -> bool:
    """Whether JSON text so far ends inside a string (an odd number of unescaped quotes)."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif inside and ch == "\\":
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def keep_closing(logits: torch.Tensor, closing_ids: torch.Tensor) -> bool:
    """If the (masked) row allows any closing token, refuse every other token, in place.
    logits: (V,), closing_ids: (k,) on its device -> whether it applied.

    Semantics (reference):
        allowed = [t for t in closing_ids if logits[t] > -inf]
        if allowed: logits[t] = -inf for every t not in allowed
    """
    vals = logits[closing_ids]                                   # (k,)
    if not bool(torch.isfinite(vals).any()):
        return False
    logits.fill_(float("-inf"))
    logits[closing_ids] = vals
    return True


def step_toward_closing(logits: torch.Tensor, matcher, candidates: torch.Tensor,
                        closing_ids: torch.Tensor) -> bool:
    """One token of lookahead: among the allowed `candidates`, most likely first (at most
    LOOKAHEAD_CANDIDATES tried), the first after which the grammar allows a closing token
    becomes the only token left, in place. logits: (V,) masked; matcher: server Matcher
    (forked, never advanced) -> whether it applied."""
    vals = logits[candidates]                                    # (k,)
    allowed = torch.isfinite(vals)
    if not bool(allowed.any()):
        return False
    order = vals[allowed].argsort(descending=True)[:LOOKAHEAD_CANDIDATES]
    closers = closing_ids.tolist()
    for token in candidates[allowed][order].tolist():
        twin = matcher.fork()
        twin.consume(token)
        bits = twin.llmatcher.compute_bitmask()                  # bytes, 1 bit per token, LSB first
        if any(bits[t >> 3] >> (t & 7) & 1 for t in closers if (t >> 3) < len(bits)):
            _keep_only(logits, token)
            return True
    return False


def close_row(logits: torch.Tensor, matcher, text: str) -> None:
    """The closing budget's rule for one row (see the module docstring), in place.
    logits: (V,) already masked by the grammar; matcher: the row's Matcher (its closing token
    sets and EOS); text: the request's output so far."""
    tokens, eos_token_id = matcher.closing, matcher.eos_token_id
    device, vocab = logits.device, logits.shape[0]
    if in_json_string(text):
        closers, onward = tokens.in_string.to(device), tokens.string_on.to(device)
        if not keep_closing(logits, closers) and not keep_closing(logits, onward):
            step_toward_closing(logits, matcher, tokens.single_char.to(device), torch.cat([closers, onward]))
        return
    ids = torch.cat([tokens.outside, torch.tensor([eos_token_id])]).to(device)
    if keep_closing(logits, ids[ids < vocab]):
        return
    if text and text[-1] in VALUE_START_AFTER:
        keep_first_allowed(logits, tokens.starts.to(device))
    else:
        keep_first_allowed(logits, tokens.comma.to(device))


def keep_first_allowed(logits: torch.Tensor, preferred: torch.Tensor) -> bool:
    """The first of `preferred` (k,) the masked row (V,) allows becomes its only token, in
    place; -> whether one was allowed."""
    allowed = torch.isfinite(logits[preferred])                  # (k,)
    if not bool(allowed.any()):
        return False
    _keep_only(logits, int(preferred[int(allowed.nonzero()[0])]))
    return True


def _keep_only(logits: torch.Tensor, token: int) -> None:
    """Refuse every token of the row (V,) but `token`, whose logit stays, in place."""
    keep = logits[token].clone()
    logits.fill_(float("-inf"))
    logits[token] = keep
