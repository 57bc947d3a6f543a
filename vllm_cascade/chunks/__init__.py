"""Chunks: reusable contexts registered once, kept as pinned KV pages, composed into requests."""
