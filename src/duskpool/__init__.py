"""duskpool: pool idle machines into one private LLM inference service."""

__version__ = "0.1.0"
