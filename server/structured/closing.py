"""Closing within the budget (ConstraintSpec.close_within): end a JSON value before max_tokens.

Inside a request's closing budget the engine calls `close_row` on that row's masked logits
(the token sets are built once per tokenizer by the GrammarCompiler and travel with each Matcher):

1. Whenever the grammar allows a token that closes the open string (`"`, `"}`, `","` ...) or,
   outside strings, closes arrays and objects (`]`, `}` ...) or ends the output (EOS), only
   those tokens stay.
2. Inside a string where none is allowed yet (a `format` or `pattern` not yet met), a bounded
   lookahead: the first token of a short path of one-character tokens after which the string
   may close (e.g. `Z` ending a date-time, `:` completing a URI scheme, the rest of a
   `mailto:` prefix) is the only one kept, and the path is followed on the next steps.
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
LOOKAHEAD_CANDIDATES = 64    # tokens tried one step ahead, then
LOOKAHEAD_DEPTH = 24         # a walk of at most this many tokens,
LOOKAHEAD_FORKS = 1024       # trying at most this many grammar states
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
    """Lookahead inside a string that cannot close yet: the first token of a short path of
    one-character tokens after which the grammar allows a closing token (`plan_to_closing`)
    becomes the only token left, in place. logits: (V,) masked; matcher: server Matcher (forked, never
    advanced) -> whether it applied.

    The path is searched once and followed on the next steps while the
    matcher is where the plan expects it (each kept token is the only one left, so it is the
    one sampled): a `mailto:` prefix, a date-time's last digits and its `Z`, the rest of a
    24-digit hex id."""
    plan = matcher.closing_plan
    if plan and plan[0] == matcher.num_consumed and bool(torch.isfinite(logits[plan[1][0]])):
        token = plan[1][0]
        matcher.closing_plan = (plan[0] + 1, plan[1][1:]) if len(plan[1]) > 1 else None
        _keep_only(logits, token)
        return True
    path = plan_to_closing(logits, matcher, candidates, closing_ids)
    if not path:
        return False
    matcher.closing_plan = (matcher.num_consumed + 1, path[1:]) if len(path) > 1 else None
    _keep_only(logits, path[0])
    return True


def plan_to_closing(logits: torch.Tensor, matcher, candidates: torch.Tensor,
                    closing_ids: torch.Tensor) -> list[int] | None:
    """Tokens from `candidates` (k,) that lead from the matcher's state to one where a token of
    `closing_ids` is allowed, or None. Shortest first: a single token after which a closer is
    allowed (among up to LOOKAHEAD_CANDIDATES, most likely first). Otherwise one walk of at
    most LOOKAHEAD_DEPTH tokens that makes progress: at each step, the most likely allowed
    candidate after which the grammar allows a different set of tokens (the pattern moved on:
    `@` in an e-mail, `/` in a path) rather than the same again (`aaaa...`), or after which a
    closer is allowed. At most LOOKAHEAD_FORKS grammar states are tried in all."""
    vals = logits[candidates]                                    # (k,)
    ranked = candidates[vals.argsort(descending=True, stable=True)].tolist()   # -inf ones last
    order = ranked[:int(torch.isfinite(vals).sum())]             # the allowed ones, likeliest first
    closers = closing_ids.tolist()

    def allows(bits, ids) -> list[int]:                          # bits: 1 per token, LSB first
        return [t for t in ids if (t >> 3) < len(bits) and bits[t >> 3] >> (t & 7) & 1]

    for token in order[:LOOKAHEAD_CANDIDATES]:
        twin = matcher.fork()
        twin.consume(token)
        if allows(twin.llmatcher.compute_bitmask(), closers):
            return [token]
    state, bits, path, forks = matcher, matcher.llmatcher.compute_bitmask(), [], 0
    for _ in range(LOOKAHEAD_DEPTH):
        step = None
        for token in allows(bits, ranked):
            if forks >= LOOKAHEAD_FORKS:
                return None
            twin = state.fork()
            twin.consume(token)
            forks += 1
            after = twin.llmatcher.compute_bitmask()
            if allows(after, closers):
                return path + [token]
            if after != bits:
                step = (token, twin, after)
                break
            if step is None:
                step = (token, twin, after)                      # no progress yet: the likeliest
        if step is None:
            return None
        path.append(step[0])
        state, bits = step[1], step[2]
    return None


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
