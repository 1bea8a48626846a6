"""Request, SamplingParams and the per-step output the engine hands back.

SamplingParams validates itself (typed errors with the offending value); the API turns a
SamplingParamsError into a 400.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.errors import PromptTooLongError

if TYPE_CHECKING:
    import torch


SEED_MIN, SEED_MAX = -2**63, 2**63 - 1     # a 64-bit signed integer, as vLLM accepts
MAX_LOGIT_BIAS = 1024                      # logit_bias entries per request


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request: seed + index, wrapped into the int64 range.
    SamplingParamsError when the request's seed itself is outside that range."""
    if not (SEED_MIN <= seed <= SEED_MAX):
        raise SamplingParamsError("seed", f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    return (seed + index - SEED_MIN) % 2**64 + SEED_MIN


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):     # pickled whole (it crosses to the ingress from a remote replica)
        return type(self), (self.param, str(self))


def check_fits(prompt_tokens: int, max_model_len: int, max_tokens: int | None = None) -> None:
    """The context rule: the prompt and at least one new token fit max_model_len
    (PromptTooLongError), and so does the prompt plus max_tokens when it is given
    (SamplingParamsError naming max_tokens)."""
    if prompt_tokens + 1 > max_model_len:
        raise PromptTooLongError(prompt_tokens, max_model_len)
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise SamplingParamsError("max_tokens", f"this model's context is {max_model_len} tokens; the prompt has "
                                  f"{prompt_tokens} and max_tokens is {max_tokens} (at most "
                                  f"{max_model_len - prompt_tokens} here)")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None           # per-request generator; same seed -> same tokens (an int64)
    stop: tuple[str, ...] = ()        # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # None = off; k >= 0: sampled token's logprob + top-k
    frequency_penalty: float = 0.0    # OpenAI: logit -= f * (times the token is in the output so far)
    presence_penalty: float = 0.0     # OpenAI: logit -= p if the token is in the output so far
    repetition_penalty: float = 1.0   # vLLM/HF: tokens in prompt or output: logit / r if > 0, else * r
    logit_bias: tuple[tuple[int, float], ...] = ()   # OpenAI: (token id, bias in [-100, 100]) added to its logit

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature <= 2.0):
            raise SamplingParamsError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (SEED_MIN <= self.seed <= SEED_MAX):
            raise SamplingParamsError("seed", f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.top_k < 0:
            raise SamplingParamsError("top_k", f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise SamplingParamsError("logprobs", f"top logprobs must be in [0, 20], got {self.logprobs}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (0.0 < self.repetition_penalty < float("inf")):
            raise SamplingParamsError("repetition_penalty",
                                      f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if len(self.stop) > 16:
            raise SamplingParamsError("stop", f"at most 16 stop strings, got {len(self.stop)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingParamsError("logit_bias", f"at most {MAX_LOGIT_BIAS} logit_bias entries, "
                                      f"got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise SamplingParamsError("logit_bias", f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not (-100.0 <= bias <= 100.0):
                raise SamplingParamsError("logit_bias", f"logit_bias values must be in [-100, 100], "
                                          f"got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


class Constraint(Protocol):
    """A request's output constraint as the engine drives it (server/structured/matcher.py's
    Matcher is the implementation). Masks are batched: any member fills or applies them for
    the whole batch, whose members all come from one implementation."""
    close_within: int          # the last N tokens before max_tokens are spent closing the value (0: off)
    close_reserve: int         # tokens a derived closing budget adds for this kind (a tool call's tags)

    def fill_masks(self, batch: list["Constraint"]) -> "torch.Tensor": ...   # int32 (n, W) allowed tokens
    def apply_masks(self, logits: "torch.Tensor", masks: "torch.Tensor") -> None: ...   # (n, V) in place
    def close(self, logits: "torch.Tensor", text: str) -> None: ...   # one masked row (V,), output so far
    def repeating(self, text: str) -> bool: ...               # the output repeats a unit its grammar knows
    def consume(self, token_id: int) -> None: ...             # GrammarError if refused
    def is_stopped(self) -> bool: ...


class Status(enum.Enum):
    WAITING = "waiting"          # queued (or preempted), holds no KV blocks
    RUNNING = "running"          # holds KV blocks, prefilling or decoding
    FINISHED = "finished"


class ErrorKind(str, enum.Enum):
    """Why a request ended with an error (RequestOutput.error_kind)."""
    ADAPTER = "adapter"          # its adapter could not be loaded or placed on the device
    TIMEOUT = "timeout"          # it ran past its deadline (Request.deadline)
    INTERNAL = "internal"        # its own work raised (a bug), or the engine stopped


class FinishReason(str, enum.Enum):
    STOP = "stop"                # EOS, stop string/token, or the grammar completed
    LENGTH = "length"            # max_tokens or the context length
    ABORT = "abort"              # client went away or the server is shutting down


_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None            # adapter name; None = base model
    constraint: Constraint | None = None  # None = unconstrained
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = 0.0
    deadline: float | None = None         # time.monotonic() past which the engine ends it (timeout)
    cache_salt: str = ""                  # prefix-cache salt: tenant namespace + cache_salt (the API's)
    # engine-owned state
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0                 # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cached_tokens: int | None = None      # prompt tokens found in the prefix cache when first admitted
    cache_root: bytes | None = None       # namespace of its hashes; None: it neither reads nor fills the cache
    block_hashes: list[bytes] = field(default_factory=list)   # chain keys of its full blocks (prefix_cache.py)
    num_registered: int = 0               # leading blocks of block_ids that are in the cache
    closing: bool = False                 # its constraint's closing rule is on (budget reached or a loop seen)
    served_by: str | None = None          # the replica that took it (set by the EngineClient)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]          # (token id, logprob), best first


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta)."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None              # set when the request failed (e.g. its adapter could not load)
    error_kind: ErrorKind | None = None   # set with error
    cached_tokens: int = 0                # prompt tokens served from the prefix cache
