"""Attention kernels: a torch path (CPU, reference) and a FlashInfer path (GPU)."""
