"""Model families: one file per family, registered here by name.

``FAMILIES`` maps a family name to its config class, model class and presets; ``preset``
looks a name up across all of them and ``model_for`` builds the model a config describes.
A new family is a new file plus one line in ``FAMILIES``.
"""

from dataclasses import dataclass

from jaxstack.models import llama, mixtral
from jaxstack.models.llama import Llama, LlamaConfig, init_cache
from jaxstack.models.mixtral import Mixtral, MixtralConfig


@dataclass(frozen=True)
class Family:
    """A model family: its config and model classes, presets and the preset it defaults to."""

    config: type[LlamaConfig]
    model: type[Llama]
    presets: dict[str, LlamaConfig]
    default: str


FAMILIES: dict[str, Family] = {
    "llama": Family(LlamaConfig, Llama, llama.PRESETS, "tiny"),
    "mixtral": Family(MixtralConfig, Mixtral, mixtral.PRESETS, "tiny-moe"),
}
"""Family name -> ``Family``; the name is what a run's config file records."""

PRESETS: dict[str, LlamaConfig] = {
    name: config for family in FAMILIES.values() for name, config in family.presets.items()
}


def preset(name: str, **overrides) -> LlamaConfig:
    """A named config of any family (``tiny`` ... ``8b``, ``tiny-moe`` ... ``qwen3-30b-a3b``)
    with field overrides.

    Raises:
        KeyError: an unknown name (the message lists them all).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def family_of(config: LlamaConfig) -> str:
    """The name of the family whose config class ``config`` is.

    Raises:
        TypeError: ``config`` is no registered family's config.
    """
    for name, family in FAMILIES.items():
        if type(config) is family.config:
            return name
    raise TypeError(
        f"{type(config).__name__} is not the config of a registered model family "
        f"({', '.join(f'{n}: {f.config.__name__}' for n, f in FAMILIES.items())})"
    )


def model_for(config: LlamaConfig) -> Llama:
    """The model ``config`` describes (``Llama`` for a ``LlamaConfig``, ``Mixtral`` for a
    ``MixtralConfig``, ...)."""
    return FAMILIES[family_of(config)].model(config)


__all__ = [
    "FAMILIES",
    "PRESETS",
    "Family",
    "Llama",
    "LlamaConfig",
    "Mixtral",
    "MixtralConfig",
    "init_cache",
    "model_for",
    "preset",
]
