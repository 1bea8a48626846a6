"""server/api/auth.py: keys file parsing, constant-time lookup, adapter globs."""
import json

import pytest

from server.api.auth import OPEN, KeyTable, bearer_token
from server.config import ConfigError

KEYS = {"keys": [
    {"key": "sk-acme-0001", "tenant": "acme", "adapters": ["acme-*", "shared"]},
    {"key": "sk-beta-0002", "tenant": "beta", "adapters": ["beta-?"], "admin": False},
    {"key": "sk-root-0003", "tenant": "ops", "adapters": ["*"], "admin": True},
]}


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_json_and_yaml_give_the_same_table(tmp_path):
    import yaml
    a = KeyTable.from_file(_write(tmp_path, "k.json", json.dumps(KEYS)))
    b = KeyTable.from_file(_write(tmp_path, "k.yaml", yaml.safe_dump(KEYS)))
    for key in ("sk-acme-0001", "sk-beta-0002", "sk-root-0003", "sk-nope-0000"):
        assert a.authenticate(key) == b.authenticate(key)
    assert a.authenticate("sk-acme-0001").tenant == "acme"
    assert a.authenticate("sk-root-0003").admin is True
    assert a.authenticate("sk-acme-0001").admin is False


def test_wrong_missing_and_prefix_keys_are_refused(tmp_path):
    t = KeyTable.from_file(_write(tmp_path, "k.json", json.dumps(KEYS)))
    assert t.authenticate(None) is None
    assert t.authenticate("") is None
    assert t.authenticate("sk-acme-000") is None         # a prefix of a real key
    assert t.authenticate("sk-acme-00011") is None       # a real key plus one character
    assert t.authenticate("SK-ACME-0001") is None


def test_adapter_globs():

    from server.api.auth import Principal
    acme = Principal("acme", ("acme-*", "shared"), False)
    assert acme.may_use("acme-support") and acme.may_use("shared")
    assert not acme.may_use("beta-1") and not acme.may_use("shared2") and not acme.may_use("xacme-1")
    beta = Principal("beta", ("beta-?",), False)
    assert beta.may_use("beta-1") and not beta.may_use("beta-12")
    assert OPEN.may_use("anything") and OPEN.admin


def test_cache_scope_is_the_tenant_unless_a_shared_namespace_is_named(tmp_path):
    data = {"keys": KEYS["keys"] + [
        {"key": "sk-pub1-0004", "tenant": "pub1", "cache_namespace": "public"},
        {"key": "sk-pub2-0005", "tenant": "pub2", "cache_namespace": "public"},
        {"key": "sk-acme-0006", "tenant": "public"},          # a tenant named like the namespace
    ]}
    t = KeyTable.from_file(_write(tmp_path, "k.json", json.dumps(data)))
    scopes = {k: t.authenticate(k).cache_scope for k in
              ("sk-acme-0001", "sk-beta-0002", "sk-pub1-0004", "sk-pub2-0005", "sk-acme-0006")}
    assert scopes["sk-pub1-0004"] == scopes["sk-pub2-0005"]
    assert len(set(scopes.values())) == 4                     # acme, beta, public (shared), tenant "public"
    assert OPEN.cache_scope == "tenant:open"


def test_open_server_without_keys():
    t = KeyTable.empty()
    assert t.open
    assert t.authenticate(None) is OPEN
    assert t.authenticate("whatever") is OPEN


@pytest.mark.parametrize("data, fragment", [
    ({}, "non-empty list 'keys'"),
    ({"keys": []}, "non-empty list 'keys'"),
    ({"keys": ["sk-x"]}, "keys[0] must be an object"),
    ({"keys": [{"key": "short", "tenant": "a"}]}, "keys[0].key"),
    ({"keys": [{"key": "sk-aaaaaaaa", "tenant": ""}]}, "keys[0].tenant"),
    ({"keys": [{"key": "sk-aaaaaaaa", "tenant": "a", "adapters": "a-*"}]}, "keys[0].adapters"),
    ({"keys": [{"key": "sk-aaaaaaaa", "tenant": "a", "admin": "yes"}]}, "keys[0].admin"),
    ({"keys": [{"key": "sk-aaaaaaaa", "tenant": "a"}, {"key": "sk-aaaaaaaa", "tenant": "b"}]}, "listed twice"),
    ({"keys": [{"key": "sk-aaaaaaaa", "tenant": "a", "cache_namespace": ""}]}, "keys[0].cache_namespace"),
    ({"keys": [{"key": "sk-aaaaaaaa", "tenant": "a", "cache_namespace": 3}]}, "keys[0].cache_namespace"),
])
def test_bad_files_raise_config_error_naming_the_entry(tmp_path, data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        KeyTable.from_file(_write(tmp_path, "k.json", json.dumps(data)))


def test_unparsable_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        KeyTable.from_file(_write(tmp_path, "k.json", "{nope"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        KeyTable.from_file(_write(tmp_path, "k.yml", "keys: [unclosed"))


@pytest.mark.parametrize("header, token", [
    (None, None), ("", None), ("Bearer sk-1", "sk-1"), ("bearer  sk-1 ", "sk-1"),
    ("Basic abc", None), ("Bearer", None), ("Bearer   ", None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token
