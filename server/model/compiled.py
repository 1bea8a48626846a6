"""CompiledDecode: the decode-only step with its decoder layers compiled by torch.compile.

One code path: the step is `LlamaForCausalLM.run`, the same function the eager step runs
(and the oracle in tests); it is given one compiled function that runs each decoder layer,
`DecoderLayer.forward` traced whole (`fullgraph=True`: a graph break is an error). The 30
layers share that one compiled function (their weights are its inputs), so compiling costs
one layer's trace, not thirty. The project's CPU kernels (server/cpu_ops.py: the matmuls,
attention, and the point-wise RMSNorm, rotary + K/V write and SiLU·up) are opaque ops inside
it; Inductor fuses what is left between them (the residual adds). On CUDA it compiles with
`mode="reduce-overhead"`: each layer replays as a CUDA graph (the slot buffers and the KV
cache never move, so addresses stay valid).

Shapes: the batch axis and the block-table width are marked unbacked while warm_up traces,
so one graph takes any size, 1 included (one sequence; a context in one block), while the
weights stay static. What remains to guard on is whether the batch has adapter rows, so
warm_up compiles those two graphs before the engine is ready; afterwards a step that would
need a new graph runs eagerly instead (`stance`), so no request waits for a compile.
Inductor keeps its compiled kernels on disk (`cache_dir()/inductor`).

When it is used (EngineConfig.compile): "auto" compiles on CUDA, where the eager step is
bound by kernel launches, and not on the CPU, where it did not pay. Measured on the default
model, batch 8, 2 cores, compiled and eager steps alternated in one process (10-step
blocks, 12 rounds): this per-layer compile ran 7% ahead of eager (medians 49.2 against 53.5,
51.8 against 55.6 and 53.0 against 57.1 ms, in runs whose blocks spread over +-15%) after
10-15 s of compiling; the whole step as one graph ran 12% ahead (48.5 against 55.4 ms) but
took 142 s to compile. Each compiled layer call still spends ~100 us in guard checks and
~60 us in its wrappers. The step's time is in its kernels (NF4 ~19 ms, attention ~5 ms of
~50), not in the Python between them. On an AVX2 CPU (2 cores, AVX2 kernels; `python -m
bench.compile_ab --batch 8 --rounds 8 --block 8`) it ran 17% ahead (71.2 against 85.5 ms)
after 15 s of compiling: worth `--compile on` for a long-running server; auto still leaves
the CPU eager, so a CPU server is ready in seconds. Once the point-wise ops became C kernels
there was nothing left for Inductor to fuse: on a 2-core Zen 4 (AVX-512), batch 8, the same
command gave compiled 34.5 against eager 34.0 ms. "on" compiles on the CPU too (it is tested
there).

Prefill and mixed prefill/decode steps stay eager: their shapes vary with every prompt.
Where compiling fails (no C++ compiler for Inductor, an op it cannot trace), the engine says
why and keeps the eager step, which computes the same maths. One known case: the torch
attention path (gather + SDPA, what runs where the CPU kernels do not, CUDA included) does
not trace with unbacked sizes in this torch (SDPA's checks guard on them), so there the
step stays eager; the CPU kernels' in-place attention traces.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from server import cpu_ops  # noqa: F401  (the CPU kernels as torch ops, for the trace)
from server.config import cache_dir
from server.lora.mapping import LoraBatch
from server.model.batch import ForwardBatch
from server.model.layers import AttentionPlan

log = logging.getLogger(__name__)


def _use_project_cache() -> None:
    """Inductor's on-disk cache under the project's cache, unless the user chose one."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir(), "inductor"))


def _layer_forward(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                   plan: AttentionPlan) -> torch.Tensor:
    return layer(h, cos, sin, batch, plan)  # (B, hidden)


class CompiledDecode:
    """model.run for decode-only batches, its decoder layers on one compiled function; call
    as the model's decode_step."""

    def __init__(self, model) -> None:
        _use_project_cache()
        self.model = model
        if model.device.type == "cuda":
            self.mode = "reduce-overhead"
            self._compiled = torch.compile(_layer_forward, fullgraph=True, mode=self.mode)
        else:  # the fused glue is a few thousand floats a loop: one thread, no OpenMP wake-ups
            # (the kernels inside take their own thread count)
            self.mode = "default"
            self._compiled = torch.compile(_layer_forward, fullgraph=True, options={"cpp.threads": 1})
        self.compile_seconds = 0.0
        self.warm = False  # after warm_up, a step never compiles: see `stance`
        # what a step whose shapes warm_up missed does: run eagerly (a test sets "fail_on_recompile")
        self.stance = "eager_on_recompile"

    def __call__(self, batch: ForwardBatch, plan: AttentionPlan) -> torch.Tensor:
        if batch.lora is not None:
            batch.lora.row_ranks()  # built here, so the traced layers read only its tensor
        if not self.warm:
            return self.model.run(batch, plan, self._tracing_layer)  # (B, vocab)
        with torch.compiler.set_stance(self.stance):
            return self.model.run(batch, plan, self._compiled)  # (B, vocab)

    def _tracing_layer(self, layer, h, cos, sin, batch, plan) -> torch.Tensor:
        """The layer call of a warm-up step: the batch axis (B) and the block-table width are
        marked unbacked, so the graph takes any size, 1 included; the weights stay static."""
        lora = batch.lora
        rows = [h, cos, sin, batch.slot_mapping, plan.decode_lens, plan.decode_rows, plan.decode_mask,
                plan.decode_block_tables] + ([lora.token_slots, lora.row_ranks()] if lora is not None else [])
        for t in rows:
            if t is not None:
                torch._dynamo.decorators.mark_unbacked(t, 0)
        for t, dim in ((plan.decode_block_tables, 1), (plan.decode_tables, 0), (plan.decode_mask, 3)):
            if t is not None:
                torch._dynamo.decorators.mark_unbacked(t, dim)
        return self._compiled(layer, h, cos, sin, batch, plan)  # (B, hidden)

    def warm_up(self, scratch_block: int) -> float:
        """Compile the step's graphs (without and with adapter rows) on dummy decode batches
        whose K/V writes and reads stay in `scratch_block`, a KV block no request holds.
        -> seconds taken. Raises what the compiler raised."""
        t0 = time.perf_counter()
        for lora in (False, True):
            self.model.forward(self._dummy(3, scratch_block, lora))
        self.compile_seconds = time.perf_counter() - t0
        self.warm = True
        return self.compile_seconds

    def _dummy(self, rows: int, block: int, lora: bool) -> ForwardBatch:
        """`rows` sequences decoding their 18th token, every block of their two-block tables
        `block`; with `lora`, the rows name slot 0 at rank 0 (the adapter path runs, adds nothing)."""
        model = self.model
        dev = model.device
        i64 = dict(dtype=torch.int64, device=dev)
        ctx = model.block_size + 2
        return ForwardBatch(
            input_ids=torch.zeros(rows, **i64), positions=torch.full((rows,), ctx - 1, **i64),
            slot_mapping=torch.full((rows,), block * model.block_size, **i64),
            block_tables=torch.full((rows, 2), block, **i64),  # (B, 2)
            query_start=torch.arange(rows + 1, **i64), context_lens=torch.full((rows,), ctx, **i64),
            logits_rows=torch.arange(rows, **i64), query_lens_cpu=[1] * rows, context_lens_cpu=[ctx] * rows,
            lora=LoraBatch.from_row_slots([0] * rows, [0] * rows, dev) if lora else None)


def enable(model, scratch_block: int) -> str:
    """Give `model` its compiled decode step, warmed up; -> what was done, in words. Where
    compiling fails the model keeps its eager step, and the words say why."""
    step = CompiledDecode(model)
    model.decode_step = step  # warm_up runs through model.forward, as a real step does
    try:
        seconds = step.warm_up(scratch_block)
    except Exception as e:  # noqa: BLE001  (any compiler failure leaves the eager step, said once)
        model.decode_step = None
        torch._dynamo.reset()
        why = f"eager decode step (compiling failed: {type(e).__name__}: {str(e).strip()[:300]})"
        log.warning("%s", why)
        log.debug("the compiler's traceback", exc_info=True)
        return why
    return f"compiled decode step ({step.mode}), compiled in {seconds:.1f} s"
