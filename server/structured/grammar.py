"""GrammarCompiler: a ConstraintSpec -> a CompiledGrammar (llguidance), cached; matchers from it.

Flow for one request:
    spec = parse_constraint(response_format, structured_outputs)     # None: unconstrained
    compiled = await compiler.compile_async(spec)                   # cached by spec hash
    request.constraint = new_matcher(compiled)                      # one per choice (n > 1)
and in the engine step, through the Matcher's Constraint methods (server/structured/matcher.py):
    bitmask = m.fill_masks(constrained)                             # int32 (n, ceil(V/32)), CPU
    m.apply_masks(logits[rows], bitmask)                            # refused tokens -> -inf
    m.consume(token); m.is_stopped()                                # -> finish "stop"

Compilation (building llguidance's lexer and parser, then computing the first mask to
prove the grammar can start) runs in a small thread pool, never on the engine loop;
llguidance drops the GIL while it works. Each wait is bounded by `timeout_s`.

JSON Schema coverage is llguidance's, run strictly: keywords it does not implement are
refused with its message naming them (e.g. 'Unimplemented keys: ["uniqueItems"]'), never
ignored, so every output that completes with "stop" validates against the schema. The
schema's own "x-guidance" may change formatting (whitespace, separators) but not this:
`lenient` and `coerce_one_of` are forced off. Enforced: type, enum, const, anyOf,
oneOf (when provably disjoint), allOf (most intersections), local $ref / $defs /
definitions, properties, required, additionalProperties, patternProperties (disjoint),
min/maxProperties (when all `properties` are required), items, prefixItems, min/maxItems,
min/maxLength, pattern (no lookaround), format (date-time, time, date, duration, email,
hostname, ipv4, ipv6, uuid, uri), minimum, maximum, exclusiveMinimum/Maximum, multipleOf.
Refused: uniqueItems, contains, not, if/then/else, dependentRequired/dependentSchemas,
propertyNames, unevaluated*, remote $ref, unknown formats, and the partial cases above.
Annotations (title, description, default, examples, $comment, ...) are ignored.
Known departure: object properties come out in the schema's `properties` order.
See docs/structured-output.md.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf

from server.errors import GrammarError
from server.structured.bitmask import apply_bitmask, fill_bitmasks
from server.structured.closing import ClosingTokens
from server.structured.matcher import Matcher
from server.structured.spec import ConstraintSpec, parse_constraint
from server.structured.tools import ToolSpec, tool_grammar

__all__ = ["GrammarCompiler", "CompiledGrammar", "ConstraintSpec", "Matcher", "apply_bitmask",
           "fill_bitmasks", "new_matcher", "parse_constraint"]

log = logging.getLogger(__name__)

# Applied after the schema's own "x-guidance": keeps enforcement strict whatever it says.
_JSON_OVERRIDES = {"lenient": False, "coerce_one_of": False}


@dataclass(frozen=True)
class CompiledGrammar:
    spec: ConstraintSpec
    template: llguidance.LLMatcher     # never advanced: new matchers are deep copies of it
    vocab_size: int
    eos_token_id: int
    closing: ClosingTokens             # the compiler's close_within token sets (one per tokenizer)


def new_matcher(compiled: CompiledGrammar, close_within: int | None = 0) -> Matcher:
    """A fresh matcher at the grammar's start (a copy of the template: microseconds).
    close_within: the spec's closing budget (ConstraintSpec.close_within)."""
    return Matcher(compiled.template.deep_copy(), compiled.vocab_size, compiled.eos_token_id, close_within,
                   compiled.closing, tool_calls=compiled.spec.kind == "tools", spec=compiled.spec)


class GrammarCompiler:
    """Compiles constraint specs for one tokenizer; thread-safe; results cached (LRU).

    hf_tokenizer: a fast Hugging Face tokenizer. llguidance copies its backend once
    (about 0.3 s for a 49k vocabulary); the tokenizer itself is never modified.
    Refusals are cached too: the same bad schema is rejected without recompiling.
    """

    def __init__(self, hf_tokenizer, timeout_s: float = 10.0, cache_size: int = 256,
                 max_workers: int = 2) -> None:
        if timeout_s <= 0:
            raise GrammarError(f"timeout_s must be > 0, got {timeout_s}")
        if cache_size < 1 or max_workers < 1:
            raise GrammarError(f"cache_size and max_workers must be >= 1, got {cache_size}, {max_workers}")
        try:
            self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)
        except ValueError as e:
            raise GrammarError(f"constrained decoding needs a fast tokenizer: {e}") from e
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.vocab_size = self._tokenizer.vocab_size
        self.eos_token_id = self._tokenizer.eos_token
        self.closing = ClosingTokens.build(hf_tokenizer)   # for close_within, with the bridge: 0.13 s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._cache: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        """Blocking compile (tests, CLI); GrammarError if refused or slower than timeout_s."""
        future = self._future(spec)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError as e:
            raise self._timeout_error(spec) from e

    async def compile_async(self, spec: ConstraintSpec) -> CompiledGrammar:
        """compile() for the event loop: waits without blocking it."""
        future = self._future(spec)
        try:
            # shield: a timed-out wait must not cancel the shared, cached compilation
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except asyncio.TimeoutError as e:
            raise self._timeout_error(spec) from e

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _timeout_error(self, spec: ConstraintSpec) -> GrammarError:
        return GrammarError(f"{_describe(spec)} took longer than {self.timeout_s:g} s to compile")

    def _future(self, spec: ConstraintSpec) -> concurrent.futures.Future:
        key = spec.cache_key
        with self._lock:
            future = self._cache.get(key)
            if future is not None and _reusable(future):
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._build, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _build(self, spec: ConstraintSpec) -> CompiledGrammar:
        start = time.perf_counter()
        grammar = _grammar_text(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        _raise_if_error(spec, matcher)
        first = matcher.compute_bitmask()       # builds the start state; proves something can begin
        _raise_if_error(spec, matcher)
        if not any(first):
            raise GrammarError(f"{_describe(spec)} cannot be satisfied: no token can start it")
        for w in matcher.get_grammar_warnings():
            log.warning("%s: %s", _describe(spec), w)
        log.debug("%s compiled in %.3f s", _describe(spec), time.perf_counter() - start)
        return CompiledGrammar(spec, matcher, self.vocab_size, self.eos_token_id, self.closing)


def _raise_if_error(spec: ConstraintSpec, matcher: llguidance.LLMatcher) -> None:
    if matcher.is_error():
        reason = matcher.get_error()
        verdict = "cannot be satisfied" if "Unsatisfiable" in reason else "is not supported"
        raise GrammarError(f"{_describe(spec)} {verdict}: {reason}")


def _reusable(future: concurrent.futures.Future) -> bool:
    """Pending, compiled, or refused (deterministic); not cancelled or crashed."""
    if not future.done():
        return True
    if future.cancelled():
        return False
    error = future.exception()
    return error is None or isinstance(error, GrammarError)


def _describe(spec: ConstraintSpec) -> str:
    if spec.kind == "json":
        return f"JSON schema {spec.name!r}" if spec.name else "JSON schema"
    return {"regex": "regex", "choice": "choice list", "grammar": "Lark grammar", "tools": "tool definitions"}[spec.kind]


def _grammar_text(spec: ConstraintSpec) -> str:
    """The llguidance grammar for a spec (cheap; the real work is in LLMatcher)."""
    try:
        if spec.kind == "json":
            defaults = {"whitespace_flexible": spec.whitespace == "flexible"}
            return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults, _JSON_OVERRIDES)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "tools":
            return llguidance.LLMatcher.grammar_from_lark(tool_grammar(ToolSpec.from_source(spec.source)))
        if spec.kind == "choice":
            literals = [json.dumps(c, ensure_ascii=False) for c in json.loads(spec.source)]
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(literals))
        return llguidance.LLMatcher.grammar_from_lark(spec.source)
    except (ValueError, UnicodeError) as e:
        raise GrammarError(f"{_describe(spec)} is malformed: {e}") from e
