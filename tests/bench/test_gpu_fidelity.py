"""bench/gpu_engine.py's fidelity checks as tests: our paged forward against transformers, base
rows and mixed-adapter rows against PEFT, within TOL. On CUDA when the machine has one (SmolLM2's
real shape, random weights), else on the CPU in a tiny shape; the dry run covers the script."""
import pytest
import torch

from bench import gpu_engine

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fidelity") / "model")
    gpu_engine.build_model(folder, dry=not CUDA)
    return folder


@pytest.mark.parametrize("with_lora", [False, True])
def test_fidelity_on_this_machines_device(model_dir, with_lora):
    result = gpu_engine.fidelity(model_dir, DEVICE, with_lora)
    assert result["device"].startswith(DEVICE)
    assert result["within_tol"], result["err"]
    if with_lora:
        assert result["min_adapter_effect"] > 10 * gpu_engine.TOL       # the adapters change the logits
        assert result["err"]["adapter_decode"] <= gpu_engine.TOL
