"""Model families: one file per family, registered here by name."""

from jaxstack.models.llama import PRESETS, Llama, LlamaConfig, init_cache, preset

__all__ = ["PRESETS", "Llama", "LlamaConfig", "init_cache", "preset"]
