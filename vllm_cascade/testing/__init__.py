"""Test helpers for vllm_cascade (tiny deterministic models, fixtures)."""
