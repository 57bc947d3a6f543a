"""User-facing entry points: the `vllm-cascade` command (and, later, HTTP routes)."""
