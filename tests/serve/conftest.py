"""One tiny model and one compiled serving engine shared by every serving test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from serve_helpers import ENGINE_OPTIONS, EOS

from jaxstack.data import ByteTokenizer
from jaxstack.generate import generate
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM

# staggered workload: ragged prompts (some longer than the token budget) and output lengths
PROMPT_LENS = (5, 37, 3, 50, 9, 23, 11, 2, 61, 14)
MAX_TOKENS = (7, 12, 20, 5, 16, 9, 30, 14, 6, 25)


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer GQA Llama with weights large enough that greedy choices are clear-cut."""
    model = Llama(preset("tiny", num_layers=2, initializer_range=0.1, max_seq_len=128))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="session")
def llm(tiny):
    model, params = tiny
    engine = LLM(model, params, tokenizer=ByteTokenizer(), progress=False, **ENGINE_OPTIONS)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def workload(tiny):
    """Prompts, output limits and the tokens ``js.generate`` gives each (greedy, stops at
    EOS), from one batched call."""
    model, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in PROMPT_LENS]
    full = generate(model, params, prompts, max_new_tokens=max(MAX_TOKENS), eos_id=EOS)
    return (
        prompts,
        list(MAX_TOKENS),
        [tokens[:m] for tokens, m in zip(full, MAX_TOKENS, strict=True)],
    )
