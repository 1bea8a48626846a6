"""loraplex: many LoRA adapters on one 4-bit base model, behind an OpenAI-compatible API."""
import os

# With few cores and other load, OpenMP threads that busy-wait on each other run several
# times slower; this must be set before torch is first imported. A bounded spin
# (GOMP_SPINCOUNT=30000) was measured too, on 2 cores at batch 8: 18% faster steps with the
# machine otherwise idle, 5x slower with one other busy process, so it stays off. The CPU
# kernels do not use OpenMP: their own threads (server/csrc/pool.h) spin at most 200 us
# after a call, then sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
