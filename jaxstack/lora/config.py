"""``LoRAConfig``: which weights get low-rank adapters, and their rank, scale and dropout."""

import re
from dataclasses import dataclass

from jaxstack.overrides import check_types

DEFAULT_TARGETS = r"attn/[qkvo]/kernel$|mlp/(gate|up|down)/kernel$|experts/(gate|up|down)$"
"""The attention and MLP projections of the Llama and Mixtral families (their experts too)."""


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters ``W_eff = W + (alpha / rank) * A @ B`` on the weights ``targets``
    names; the base weights stay frozen (``jaxstack.lora``'s module doc)."""

    rank: int = 16
    """Adapter rank ``r`` (``A: [*in, r]``, ``B: [r, *out]``); 0 disables LoRA (full
    fine-tuning), the default of ``jaxstack train``'s ``--lora.rank``."""
    alpha: float = 32.0
    """Scale numerator: the update is ``alpha / rank * A @ B`` (PEFT's ``lora_alpha``)."""
    dropout: float = 0.0
    """Probability of dropping each input feature of an adapter for one training step
    (rows of ``A``); 0 in evaluation. See docs/lora.md for how this differs from PEFT's
    per-token dropout."""
    targets: str = DEFAULT_TARGETS
    """Regex searched in each parameter path (``layers_0/attn/q/kernel``) and, for the
    Llama/Mixtral modules, in the path spelled with Hugging Face module names
    (``layers_0/self_attn/q_proj/kernel``): ``q_proj|v_proj`` and ``attn/[qv]/`` both work."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 1 (or 0: no LoRA)")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        try:
            re.compile(self.targets)
        except re.error as error:
            raise ValueError(f"lora.targets={self.targets!r} is not a regex: {error}") from None

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained (``rank > 0``)."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on ``A @ B``."""
        return self.alpha / self.rank
