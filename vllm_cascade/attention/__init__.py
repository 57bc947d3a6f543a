"""Cascade attention: planning (pure), metadata, and the vLLM backend."""
