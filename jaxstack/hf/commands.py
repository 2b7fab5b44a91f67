"""Plain functions behind the ``jaxstack generate --hf DIR`` and ``jaxstack convert`` commands."""

import contextlib
import os
from typing import Any

import jax
from jax.sharding import Mesh

from jaxstack.data import load_tokenizer
from jaxstack.generate import complete
from jaxstack.hf.loading import ParamSpecs, load


def generate_text(
    hf_dir: str | os.PathLike,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    mesh: Mesh | None = None,
    param_specs: ParamSpecs | None = None,
    **config_overrides: Any,
) -> list[str]:
    """Continue each prompt with the model and ``tokenizer.json`` of a Hugging Face directory.

    Prompts start with the tokenizer's BOS token when it has one; a row stops at the EOS
    token. Greedy when ``temperature`` is 0. Returns the decoded continuations only.

    Raises:
        FileNotFoundError: ``hf_dir`` has no config.json, weights or tokenizer.json.
    """
    tokenizer = load_tokenizer(hf_dir)
    model, config, params = load(hf_dir, mesh=mesh, param_specs=param_specs, **config_overrides)
    eos_id = tokenizer.eos_id
    if eos_id is None and isinstance(config.extra.get("eos_token_id"), int):
        eos_id = config.extra["eos_token_id"]
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    options.update(top_p=top_p, seed=seed, eos_id=eos_id)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return complete(model, params, tokenizer, prompts, **options)
