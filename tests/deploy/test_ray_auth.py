"""API keys and tenants against the replicated app: the single server's own test cases, unchanged
(`live_server` is the app here: tests/deploy/conftest.py)."""
from __future__ import annotations

import pytest

from tests.e2e.test_auth import (  # noqa: F401  (collected here, against the app)
    test_base_model_is_open_to_every_key,
    test_missing_or_wrong_key_is_401,
    test_non_admin_cannot_load_or_unload,
    test_openai_client_without_the_right_key,
    test_tenant_cannot_use_another_tenants_adapter,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
