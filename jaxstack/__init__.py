"""jaxstack: distributed training and inference of LLMs from three user functions.

``import jaxstack as js``: ``js.Trainer`` / ``js.TrainConfig`` run ``collate_fn``,
``loss_fn`` and ``pred_fn``; ``js.Predictor`` runs ``pred_fn`` alone; ``js.models`` holds the
model families; ``js.generate`` decodes with a KV cache; ``js.LLM`` serves batches of
prompts with continuous batching over a paged KV cache (``js.serve``: the engine and HTTP
server); ``js.LoRAConfig`` / ``js.lora`` train low-rank adapters and exchange them with
PEFT; ``js.hf`` loads and exports Hugging Face checkpoints; ``js.make_mesh`` builds meshes;
``js.sharding`` holds the sharding rules, plans and overrides.
"""

from jaxstack import hf, lora, models, sharding
from jaxstack.checkpoint import CheckpointManager, load_params
from jaxstack.generate import generate
from jaxstack.lora import LoRAConfig
from jaxstack.mesh import make_mesh
from jaxstack.predictor import Predictor
from jaxstack.trainer import NonFiniteError, TrainConfig, Trainer

__all__ = [
    "LLM",
    "CheckpointManager",
    "LoRAConfig",
    "NonFiniteError",
    "Predictor",
    "SamplingParams",
    "TrainConfig",
    "Trainer",
    "generate",
    "hf",
    "load_params",
    "lora",
    "make_mesh",
    "models",
    "sharding",
]


def __getattr__(name: str):
    """``js.LLM`` and ``js.SamplingParams`` import the serving engine on first use, so that
    ``import jaxstack`` and training never load it."""
    if name in ("LLM", "SamplingParams"):
        from jaxstack import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'jaxstack' has no attribute {name!r}")
