import os

# Before torch (and triton) are first imported by any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Triton kernels are checked in Triton's CPU interpreter where there is no GPU (CI never has
# one). The variable is read when triton is first imported, so it is set here, for the whole
# session, rather than in tests/lora/ (another package's tests may import triton first).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
