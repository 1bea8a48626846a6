"""server/lora/registry.py: adapter names, discovery confined to adapters_dir, unload/register."""
import os

import pytest

from server.errors import AdapterError
from server.lora.adapter import write_random_adapter
from server.lora.registry import AdapterRegistry, check_name, valid_name
from tests.lora.helpers import tiny_arch


def test_names():
    for good in ("a", "my-adapter_v1.2", "A" * 128, "..a", "a..b"):
        assert valid_name(good)
        check_name(good)
    for bad in ("", ".", "..", "a/b", "../x", "x" * 129, "a b", "é", None, "a\x00"):
        assert not valid_name(bad)
        with pytest.raises(AdapterError, match="invalid adapter name"):
            check_name(bad)


def test_discovery_is_confined_to_the_root(tmp_path):
    root = tmp_path / "adapters"
    write_random_adapter(str(root / "a0"), tiny_arch(), 2, 8, ("q_proj",), seed=0)
    write_random_adapter(str(tmp_path / "outside"), tiny_arch(), 2, 8, ("q_proj",), seed=1)
    os.symlink(tmp_path / "outside", root / "escape")
    os.symlink(root / "a0", root / "alias")
    (root / "empty").mkdir()
    reg = AdapterRegistry(str(root))
    assert reg.find("a0").path == str(root / "a0")
    assert reg.find("escape") is None           # a symlink out of the root is not an adapter
    assert reg.find("alias").path == str(root / "a0")   # one inside the root is
    assert reg.find("empty") is None and reg.find("missing") is None and reg.find("..") is None
    reg.scan()
    assert sorted(reg.entries) == ["a0", "alias"]


def test_unload_and_register(tmp_path):
    root = tmp_path / "adapters"
    write_random_adapter(str(root / "a0"), tiny_arch(), 2, 8, ("q_proj",), seed=0)
    reg = AdapterRegistry(str(root))
    entry = reg.live("a0")
    gen = entry.generation
    reg.mark_unloaded("a0")
    assert entry.unloading and entry.generation == gen + 1
    with pytest.raises(AdapterError, match="unknown adapter 'a0'"):
        reg.live("a0")
    del reg.entries["a0"]                       # what the store does once no request pins it
    assert reg.find("a0") is None               # not rediscovered from the folder
    again = reg.register("a0", str(root / "a0"))
    assert reg.live("a0") is again and not again.unloading
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        reg.live("nope")
