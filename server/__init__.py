"""loraplex: many LoRA adapters on one 4-bit base model, behind an OpenAI-compatible API."""
import os

# With few cores and other load, OpenMP threads that busy-wait on each other run several
# times slower; this must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
