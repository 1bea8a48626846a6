"""server/api/state.py: adapter names, the base model id, and the waiting-queue gate."""
import pytest

from server.api import errors
from server.api.auth import KeyTable
from server.api.state import ServerState, base_model_id, valid_adapter_name
from server.config import ServerConfig


@pytest.mark.parametrize("name, ok", [("acme-support", True), ("v1.2_b", True), ("_x", True), ("a" * 128, True),
                                      ("a" * 129, False), ("..", False), (".", False), ("../x", False),
                                      ("a/b", False), ("x\n", False), ("", False), ("a b", False)])
def test_adapter_names(name, ok):
    assert valid_adapter_name(name) is ok


def test_base_model_id(tmp_path):
    assert base_model_id("default") == "SmolLM2-135M-Instruct"
    folder = tmp_path / "Llama-3.2-1B"
    folder.mkdir()
    assert base_model_id(str(folder)) == "Llama-3.2-1B"
    assert base_model_id(str(folder) + "/") == "Llama-3.2-1B"
    assert base_model_id("/models/qwen2.5-0.5b-q8_0.gguf") == "qwen2.5-0.5b-q8_0"


def test_queue_gate_admits_up_to_max_queue():
    state = ServerState(cfg=ServerConfig(max_queue=5), keys=KeyTable.empty(), base_id="m")
    state.admit(3)
    state.admit(2)
    with pytest.raises(errors.APIError) as e:
        state.admit(1)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    assert state.gate.waiting == 5          # a refused request takes no place
    state.release(3)
    state.admit(3)
    assert state.gate.waiting == 5
    assert state.is_base("m") and state.is_base("base") and not state.is_base("acme")
