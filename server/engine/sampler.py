"""Sampler: one batched draw per step (penalties, greedy, temperature, top-k, top-p, per-request seeds).

Random rows draw with the exponential race: token = argmax(p / q), q ~ Exp(1) i.i.d., which
samples from p exactly. A seeded request draws its q from its own torch.Generator, so its
tokens do not depend on which other requests share the batch; unseeded rows share one
generator seeded from config.seed. Penalties (OpenAI's frequency/presence over the output so
far, vLLM's repetition over prompt and output) change the logits first, for every row that
asks. Logprobs are log_softmax of those logits (after any grammar mask and penalty, before
temperature). Everything the host needs comes back in one .tolist().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams, TokenLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _torch_argmax(x: torch.Tensor) -> torch.Tensor:
    # max's indices are argmax's (the first maximum; NaN wins in both), at half the time:
    # 0.5 against 1.1 ms over (32, 49152) float32 logits, 2 threads
    return x.max(dim=-1).indices  # (n,)


def choose_argmax(device: torch.device):
    """The greedy pick, chosen once: the CPU kernel's (server/cpu_kernel.py; the same indices,
    ~30 us against torch's ~460 us over (8, 49152) float32 logits here) on a CPU where it
    builds, else torch's."""
    if device.type == "cpu":
        from server.cpu_kernel import KernelUnavailable, load
        try:
            kernel = load()
        except KernelUnavailable:
            return _torch_argmax
        return kernel.argmax  # the sampler's logits are float32 rows with unit column stride
    return _torch_argmax


class Sampler:
    def __init__(self, device: torch.device | str, seed: int) -> None:
        self.device = torch.device(device)
        self.shared = torch.Generator(device=self.device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.argmax = choose_argmax(self.device)  # (n, V) -> (n,) int64: each row's first maximum

    def release(self, key: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(key, None)

    def register(self, key: str, seed: int | None) -> None:
        """Create a seeded request's generator up front, so a seed torch refuses fails the
        request when it is added rather than in a batch."""
        if seed is not None:
            self._generator(key, seed)

    def _generator(self, key: str, seed: int) -> torch.Generator:
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[key] = g
        return g

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], keys: list[str],
               history: list[tuple[list[int], list[int]]] | None = None) -> SamplerOutput:
        """logits (n, V) float32, one row per request -> a token (and logprobs) per row.

        history: (prompt ids, output ids so far) per row; needed when a row has a penalty.
        """
        n, vocab = logits.shape
        assert len(params) == n == len(keys)
        if n == 0:
            return SamplerOutput([], [])
        penalized = [i for i, p in enumerate(params) if p.penalized]
        if penalized:
            assert history is not None and len(history) == n, "penalties need each row's token history"
            logits = logits.clone()
            for i in penalized:
                _penalize(logits[i], params[i], *history[i])
        tokens = self.argmax(logits)  # (n,)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            tokens[random_rows] = self._draw(logits[random_rows], [params[i] for i in random_rows],
                                             [keys[i] for i in random_rows])
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if k is None:
            return SamplerOutput(tokens.tolist(), [None] * n)
        logp = torch.log_softmax(logits, dim=-1)  # (n, V)
        chosen = logp.gather(1, tokens[:, None])  # (n, 1)
        top_lp, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])  # (n, k)
        packed = torch.cat([tokens[:, None].double(), chosen.double(), top_ids.double(), top_lp.double()],
                           dim=1).tolist()  # (n, 2 + 2k), the step's one host sync
        out: list[TokenLogprob | None] = []
        for row, p in zip(packed, params):
            if p.logprobs is None:
                out.append(None)
                continue
            ids, lps = row[2:2 + k][:p.logprobs], row[2 + k:][:p.logprobs]
            out.append(TokenLogprob(int(row[0]), row[1], [(int(t), v) for t, v in zip(ids, lps)]))
        return SamplerOutput([int(row[0]) for row in packed], out)

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams], keys: list[str]) -> torch.Tensor:
        """Random rows: temperature, top-k, top-p, then the exponential race. -> (m,) int64"""
        m, vocab = logits.shape
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        scaled = logits / temps[:, None]  # (m, V)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled = _filter_top_k_top_p(scaled, params)
        probs = torch.softmax(scaled, dim=-1)  # (m, V)
        q = torch.empty_like(probs)
        shared = [i for i, p in enumerate(params) if p.seed is None]
        if shared:
            q[shared] = torch.empty(len(shared), vocab, dtype=probs.dtype, device=probs.device).exponential_(
                generator=self.shared)
        for i, (p, key) in enumerate(zip(params, keys)):
            if p.seed is not None:
                q[i].exponential_(generator=self._generator(key, p.seed))
        return self.argmax(probs / q)  # (m,)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    """Add each row's logit_bias to its logits (n, V), in place (before the grammar mask, so a
    bias never makes a token the grammar forbids possible)."""
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=logits.device)
            vals = torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, vals)


def _penalize(row: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """In place on one row's logits (V,): repetition (vLLM/HF), then frequency and presence (OpenAI).

    Reference: for t in set(prompt + output): row[t] = row[t] / r if row[t] > 0 else row[t] * r
               for t in output: row[t] -= f * output.count(t) + (presence if t in output else 0)
    """
    vocab = row.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=row.device)
        seen = seen[seen < vocab]  # (k,)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output_ids and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        ids = torch.tensor(output_ids, dtype=torch.long, device=row.device)
        counts = torch.zeros(vocab, dtype=row.dtype, device=row.device).index_add_(
            0, ids, torch.ones(len(output_ids), dtype=row.dtype, device=row.device))  # (V,)
        row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty


def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p nucleus to -inf (the best token always stays)."""
    m, vocab = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (m, V)
    rank = torch.arange(vocab, device=logits.device)[None, :]  # (1, V)
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)
    drop = rank >= top_k[:, None]  # (m, V)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)  # (m, V)
    mass_before = probs.cumsum(dim=-1) - probs  # (m, V) probability of the better tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)  # (m, V)
