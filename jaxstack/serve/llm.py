"""``js.LLM``: load a model once, then generate for batches of prompts through the engine."""

import dataclasses
import os
import threading
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from jaxstack import hf as hf_io
from jaxstack.checkpoint import load_params, saved_param_shapes
from jaxstack.data import load_tokenizer
from jaxstack.data.chat import read_chat_template
from jaxstack.data.tokenizers import Tokenizer
from jaxstack.metrics import long_step
from jaxstack.models import model_for
from jaxstack.models.llama import Llama
from jaxstack.run import RunConfig
from jaxstack.serve.engine import Engine, EngineConfig, QueueFullError, RequestOutput
from jaxstack.serve.runner import serving_param_specs
from jaxstack.serve.sampling import SamplingParams

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""Serving dtypes (weights, KV cache and compute); ``auto`` is resolved by ``resolve_dtype``."""


class LLM:
    """An engine over a model from memory, a Hugging Face directory or a training run.

    ``LLM(model, params, tokenizer=...)``, ``LLM(hf="DIR")`` or ``LLM(work_dir="DIR")``;
    ``config`` and keyword overrides (``num_pages=``, ``token_buckets=``, ...) size the
    engine (``EngineConfig``); ``mesh`` serves tensor-parallel. ``close()`` (or a ``with``
    block) stops the engine thread.

    ``dtype`` (one of ``DTYPES``) is the serving dtype of the weights, the KV cache and the
    compute. ``auto``: for ``hf``, the checkpoint's ``torch_dtype``; otherwise (or without
    one) bfloat16 on GPU/TPU and, on CPU, the model config's dtype; a model given in memory
    is served as given. ``hf`` and ``work_dir`` weights are read straight into their serving
    placement (one tensor at a time, each device receiving only its shard) in that dtype,
    never whole on one device.

    ``attention_sinks=N`` keeps a sliding-window model's first ``N`` tokens visible to every
    later token (StreamingLLM; ``LlamaConfig.attention_sinks``); KV pages are still kept
    for the whole sequence.

    Raises:
        ValueError: not exactly one of model, hf, work_dir; unknown config keys; an unknown
            dtype; ``attention_sinks`` for a model without a sliding window.
    """

    def __init__(
        self,
        model: Llama | None = None,
        params=None,
        *,
        hf: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        tokenizer: Tokenizer | None = None,
        eos_id: int | Sequence[int] | None = None,
        mesh: Mesh | None = None,
        dtype: str = "auto",
        attention_sinks: int = 0,
        config: EngineConfig | None = None,
        progress: bool = True,
        **config_overrides,
    ):
        if sum(x is not None for x in (model, hf, work_dir)) != 1:
            raise ValueError("give exactly one of model (with params), hf=DIR or work_dir=DIR")
        unknown = sorted(set(config_overrides) - EngineConfig.field_names())
        if unknown:
            raise ValueError(
                f"unknown engine options {unknown}; valid: {sorted(EngineConfig.field_names())}"
            )
        config = dataclasses.replace(config or EngineConfig(), **config_overrides)
        self.chat_template: str | None = None
        """The model's Jinja chat template (``tokenizer_config.json``), if it has one."""
        self.chat_tokens: dict[str, str] = {}
        """``bos_token`` / ``eos_token`` strings for the chat template."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
        if hf is not None:
            if attention_sinks:  # refused before any weight is read
                with_attention_sinks(hf_io.load_config(hf), attention_sinks)
            tokenizer = tokenizer or load_tokenizer(hf)
            with long_step(f"loading weights from {hf}", progress):
                model, params = load_hf_for_serving(hf, dtype, mesh)
            self.chat_template, self.chat_tokens = read_chat_template(hf)
            self.name = os.path.basename(os.path.normpath(hf))
        elif work_dir is not None:
            run = RunConfig.load(work_dir)
            with long_step(f"loading weights from {work_dir}", progress):
                model, params = load_run_for_serving(work_dir, run.model, dtype, mesh)
            tokenizer = tokenizer or load_tokenizer(run.data.tokenizer)
            self.name = os.path.basename(os.path.normpath(work_dir))
        else:
            if params is None:
                raise ValueError("a model needs its params: LLM(model, params)")
            if dtype != "auto":
                model = model.clone(config=dataclasses.replace(model.config, dtype=dtype))
                params = cast(params, dtype)
            self.name = type(model).__name__.lower()
        if attention_sinks:
            model = model.clone(config=with_attention_sinks(model.config, attention_sinks))
        if eos_id is None:  # the tokenizer's, and every id the model's configs name
            named = [getattr(tokenizer, "eos_id", None)]
            named += hf_io.eos_ids(model.config.extra.get("eos_token_id"))
            named += hf_io.read_eos_ids(hf) if hf is not None else []
            eos_id = tuple(dict.fromkeys(i for i in named if i is not None)) or None
        self.tokenizer = tokenizer
        self.engine = Engine(
            model, params, config, tokenizer=tokenizer, eos_id=eos_id, mesh=mesh, progress=progress
        )

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt (BOS first when the tokenizer has one); ids pass through."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token id lists instead")
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_id is not None)
        return list(prompt)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Final outputs for ``prompts`` (texts or token id lists), in order; ``sampling`` is
        one ``SamplingParams`` for all or one per prompt (default greedy, 16 tokens)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p) for p in prompts]
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(ids)
        if len(sampling) != len(ids):
            raise ValueError(f"{len(sampling)} SamplingParams for {len(ids)} prompts")
        results: list[RequestOutput | None] = [None] * len(ids)
        done = threading.Semaphore(0)

        def collect(index: int):
            def on_output(output: RequestOutput) -> None:
                if output.finished:
                    results[index] = output
                    done.release()

            return on_output

        submitted = 0
        for index, (prompt, params) in enumerate(zip(ids, sampling, strict=True)):
            while True:
                try:
                    self.engine.submit(prompt, params, collect(index))
                    break
                except QueueFullError:  # wait for one to finish, then retry
                    done.acquire()
                    submitted -= 1
            submitted += 1
        for _ in range(submitted):
            done.acquire()
        return results

    def close(self) -> None:
        """Stop the engine thread."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_attention_sinks(config, sinks: int):
    """``config`` (a model config) keeping its first ``sinks`` tokens visible past its
    sliding window; the same params serve it.

    Raises:
        ValueError: the model has no sliding window, naming the fix.
    """
    if config.sliding_window is None:
        raise ValueError(
            f"attention_sinks={sinks} needs a model with a sliding window, and this one "
            "attends to every earlier token already (its config has no sliding_window); "
            "drop attention_sinks / --attention-sinks"
        )
    return dataclasses.replace(config, attention_sinks=sinks)


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, cpu_default: str) -> str:
    """The serving dtype ``dtype`` names: itself, or for ``auto`` the ``checkpoint_dtype``
    (a ``torch_dtype``), else bfloat16 on GPU/TPU and ``cpu_default`` on CPU."""
    if dtype != "auto":
        return dtype
    if checkpoint_dtype in DTYPES[1:]:
        return checkpoint_dtype
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else cpu_default


def hf_serving_dtype(hf_config: dict, dtype: str) -> str:
    """``resolve_dtype`` for a checkpoint with the ``config.json`` dict ``hf_config``."""
    stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return resolve_dtype(dtype, stored, "float32")


def load_hf_for_serving(directory: str | os.PathLike, dtype: str, mesh: Mesh | None):
    """``(model, params)`` of a Hugging Face directory in the serving ``dtype`` (see ``LLM``),
    each tensor streamed into the serving placement on ``mesh`` (the first device without
    one) by ``jaxstack.hf.read_params``."""
    dtype = hf_serving_dtype(hf_io.read_hf_config(directory), dtype)
    config = hf_io.load_config(directory, dtype=dtype)
    model = hf_io.family_for_config(config).model(config)
    specs = None if mesh is None else lambda abstract, m: serving_param_specs(model, abstract, m)
    params = hf_io.read_params(directory, config, mesh=mesh, param_specs=specs, param_dtype=dtype)
    return model, params


def load_run_for_serving(work_dir: str | os.PathLike, config, dtype: str, mesh: Mesh | None):
    """``(model, params)`` of the latest checkpoint of a run of the model ``config`` in the
    serving ``dtype``, restored straight into the serving placement on ``mesh`` (see
    ``LLM``)."""
    dtype = resolve_dtype(dtype, None, config.dtype)
    model = model_for(dataclasses.replace(config, dtype=dtype))
    specs = None
    if mesh is not None:
        specs = serving_param_specs(model, saved_param_shapes(work_dir), mesh)
    return model, cast(load_params(work_dir, mesh=mesh, param_specs=specs), dtype)


def cast(params, dtype: str):
    """``params`` with every floating leaf in ``dtype``, converted one leaf at a time on its
    devices (a leaf's old buffer is freed as soon as no one else holds ``params``)."""
    leaves, treedef = jax.tree.flatten(params)
    del params
    for i, leaf in enumerate(leaves):
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and leaf.dtype != dtype:
            leaves[i] = leaf.astype(dtype)
    return jax.tree.unflatten(treedef, leaves)
