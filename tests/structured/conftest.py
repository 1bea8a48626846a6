"""tests/structured: the default model's tokenizer and one GrammarCompiler shared by the package."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.model.default import ensure_default_model
from server.structured.grammar import GrammarCompiler


@pytest.fixture(scope="session")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


@pytest.fixture(scope="session")
def compiler(hf_tokenizer):
    c = GrammarCompiler(hf_tokenizer)
    yield c
    c.close()
