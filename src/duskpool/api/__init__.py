"""HTTP: OpenAI- and Ollama-compatible APIs, the live dashboard, Prometheus metrics."""

DEFAULT_PORT = 7470  # Ollama has 11434, LM Studio 1234, exo 52415; duskpool's nodes listen on 7471
