"""Shared transformer layers: norms, rotary embeddings, attention, MLPs."""
