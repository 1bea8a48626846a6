"""The typed errors raised at the project's boundaries.

Each carries a message meant for the user (it names the offending file, value or field);
the CLI prints it without a traceback and the API maps it to an OpenAI-shaped error.
"""
from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error whose message is for the user."""


class ModelLoadError(LoraplexError):
    """A model path, config or weights file cannot be used (missing, corrupt, unsupported)."""


class AdapterError(LoraplexError):
    """An adapter cannot be loaded or used (bad config, bad shapes, rank too large, unknown name)."""


class GrammarError(LoraplexError):
    """A response_format / structured_outputs constraint cannot be compiled or is unsupported."""


class PromptTooLongError(LoraplexError):
    """The prompt (plus at least one generated token) does not fit the context length."""

    def __init__(self, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens; this model's context is {max_model_len} tokens")
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len

    def __reduce__(self):     # pickled whole (it crosses to the ingress from a remote replica)
        return type(self), (self.prompt_tokens, self.max_model_len)


class ReplicaLostError(LoraplexError):
    """The remote replica running a request stopped (killed, crashed) before the request ended."""
