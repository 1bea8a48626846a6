"""PagedSequences lives in bench/fixtures.py (the GPU scripts use it too); tests import it from here."""
from bench.fixtures import PagedSequences  # noqa: F401
