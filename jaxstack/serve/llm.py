"""``js.LLM``: load a model once, then generate for batches of prompts through the engine."""

import dataclasses
import os
import threading
from collections.abc import Sequence as SequenceOf

from jax.sharding import Mesh

from jaxstack import hf as hf_io
from jaxstack.data import load_tokenizer
from jaxstack.data.chat import read_chat_template
from jaxstack.data.tokenizers import Tokenizer
from jaxstack.metrics import long_step
from jaxstack.models.llama import Llama
from jaxstack.run import load_run
from jaxstack.serve.engine import Engine, EngineConfig, QueueFullError, RequestOutput
from jaxstack.serve.sampling import SamplingParams


class LLM:
    """An engine over a model from memory, a Hugging Face directory or a training run.

    ``LLM(model, params, tokenizer=...)``, ``LLM(hf="DIR")`` or ``LLM(work_dir="DIR")``;
    ``config`` and keyword overrides (``num_pages=``, ``token_buckets=``, ...) size the
    engine (``EngineConfig``); ``mesh`` serves tensor-parallel. ``close()`` (or a ``with``
    block) stops the engine thread.

    Raises:
        ValueError: not exactly one of model, hf, work_dir; unknown config keys.
    """

    def __init__(
        self,
        model: Llama | None = None,
        params=None,
        *,
        hf: str | os.PathLike | None = None,
        work_dir: str | os.PathLike | None = None,
        tokenizer: Tokenizer | None = None,
        eos_id: int | SequenceOf[int] | None = None,
        mesh: Mesh | None = None,
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
        if hf is not None:
            tokenizer = tokenizer or load_tokenizer(hf)
            with long_step(f"loading weights from {hf}", progress):
                model, _, params = hf_io.load(hf)
            self.chat_template, self.chat_tokens = read_chat_template(hf)
            self.name = os.path.basename(os.path.normpath(hf))
        elif work_dir is not None:
            with long_step(f"loading weights from {work_dir}", progress):
                run, model, params = load_run(work_dir)
            tokenizer = tokenizer or load_tokenizer(run.data.tokenizer)
            self.name = os.path.basename(os.path.normpath(work_dir))
        else:
            if params is None:
                raise ValueError("a model needs its params: LLM(model, params)")
            self.name = type(model).__name__.lower()
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
        prompts: str | list[int] | SequenceOf[str | list[int]],
        sampling: SamplingParams | SequenceOf[SamplingParams] | None = None,
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
