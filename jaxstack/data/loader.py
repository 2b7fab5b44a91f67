"""Deterministic, checkpointable, multi-host batch loader built on ``grain``.

Order: epoch ``e`` visits the dataset in a permutation drawn from ``seed + e`` (grain's
index shuffle, O(1) memory) or in order when ``shuffle=False``. Global batch ``b`` of the
epoch is positions ``[b * B, (b + 1) * B)`` of that permutation; the last ``len % B``
examples of each epoch are dropped. Shard ``k`` of ``K`` takes positions
``[k * B/K, (k + 1) * B/K)`` of every global batch, so concatenating the shards' batches in
shard order gives exactly the global batch, and each host reads only its own examples.

Position: the loader counts global steps. Its state does not depend on the shard, so every
host saves the same state and a run can resume on a different number of hosts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

_STATE_VERSION = 1
# Fields of a state that must match the loader it is restored into.
_CONFIG_KEYS = ("seed", "shuffle", "batch_size", "dataset_size")


class DataLoader:
    """Yields ``collate_fn`` applied to this shard's share of each global batch.

    Args:
        dataset: any random-access sequence (``__len__`` and ``__getitem__``), e.g. a list
            of raw examples or a :class:`~jaxstack.data.text.PackedDataset`.
        batch_size: GLOBAL batch size ``B``; each shard yields ``B // shard_count`` examples
            per step.
        collate_fn: host-side ``collate_fn(examples) -> dict[str, np.ndarray]``.
        shuffle: reshuffle every epoch, deterministically from ``seed``.
        seed: shuffle seed in ``[0, 2**32)``.
        num_epochs: epochs to yield; ``None`` repeats forever.
        shard_index: this shard (host), usually ``jax.process_index()``.
        shard_count: number of shards, usually ``jax.process_count()``.
        prefetch: batches prepared ahead in background threads; 0 loads on demand.

    Raises:
        TypeError: ``dataset`` is not random-access or ``collate_fn`` is not callable.
        ValueError: a bad batch size, shard, seed, epoch count or prefetch, or a dataset
            smaller than one global batch.

    One iterator at a time: ``iter(loader)`` continues from the loader's position, and
    every batch it yields advances that position.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        *,
        batch_size: int,
        collate_fn: Callable[[list[Any]], dict[str, np.ndarray]],
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int | None = None,
        shard_index: int = 0,
        shard_count: int = 1,
        prefetch: int = 2,
    ):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"dataset must support len() and indexing, got {type(dataset).__name__}; "
                "wrap an iterable in list(...)"
            )
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        shard_count = _check_int("shard_count", shard_count, low=1)
        batch_size = _check_int("batch_size", batch_size, low=1)
        shard_index = _check_int("shard_index", shard_index, low=0)
        prefetch = _check_int("prefetch", prefetch, low=0)
        seed = _check_int("seed", seed, low=0)
        if seed >= 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if num_epochs is not None:
            num_epochs = _check_int("num_epochs", num_epochs, low=1)
        if shard_index >= shard_count:
            raise ValueError(f"shard_index={shard_index} must be < shard_count={shard_count}")
        if batch_size % shard_count:
            raise ValueError(
                f"global batch_size={batch_size} is not divisible by shard_count={shard_count}; "
                f"use a multiple of {shard_count}"
            )
        if len(dataset) < batch_size:
            raise ValueError(
                f"dataset has {len(dataset)} examples, fewer than one global batch of "
                f"{batch_size}; lower batch_size or add data"
            )
        self._dataset = dataset
        self._collate_fn = collate_fn
        self._shuffle = bool(shuffle)
        self._seed = seed
        self._batch_size = batch_size
        self._dataset_size = len(dataset)
        self._shard_index = shard_index
        self.local_batch_size = batch_size // shard_count
        self._read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        order = grain.MapDataset.range(self._dataset_size)
        self._order = order.shuffle(seed=seed) if shuffle else order
        self._steps = (
            grain.MapDataset.range(len(self))
            .repeat(num_epochs)
            .map_with_index(lambda step, _: self._load_step(step))
        )
        self._step = 0

    def __len__(self) -> int:
        """Batches per epoch (the last partial global batch is dropped)."""
        return self._dataset_size // self._batch_size

    def shard_indices(self, step: int) -> list[int]:
        """Dataset indices this shard reads at global step ``step``."""
        epoch, batch = divmod(step, len(self))
        start = (
            epoch * self._dataset_size
            + batch * self._batch_size
            + self._shard_index * self.local_batch_size
        )
        return [int(self._order[start + j]) for j in range(self.local_batch_size)]

    def _load_step(self, step: int) -> dict[str, np.ndarray]:
        return self._collate_fn([self._dataset[i] for i in self.shard_indices(step)])

    def _iterator_at(self, step: int) -> grain.DatasetIterator:
        return iter(self._steps[step:].to_iter_dataset(self._read_options))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yields batches from the current position until ``num_epochs`` are done."""
        position = self._step
        it = self._iterator_at(position)
        try:
            while True:
                if self._step != position:  # set_state() was called while iterating
                    it.close()
                    position = self._step
                    it = self._iterator_at(position)
                try:
                    batch = next(it)
                except StopIteration:
                    return
                position += 1
                self._step = position
                yield batch
        finally:
            it.close()

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next global step and the settings it depends on."""
        epoch, batch = divmod(self._step, len(self))
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "batch_size": self._batch_size,
            "dataset_size": self._dataset_size,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to the position in ``state`` (from :meth:`get_state`, any shard).

        The next batch is the one that followed when ``state`` was taken; this also applies
        to an iterator already running.

        Raises:
            ValueError: ``state`` is malformed, or was taken with a different seed, shuffle,
                global batch size or dataset size.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a DataLoader state (version {_STATE_VERSION}): {state!r}; "
                "pass the dict returned by get_state()"
            )
        current = self.get_state()
        wrong = [
            f"{k}={state.get(k)!r} (this loader has {current[k]!r})"
            for k in _CONFIG_KEYS
            if state.get(k) != current[k]
        ]
        if wrong:
            raise ValueError(
                "state was taken from a loader with different settings: "
                + ", ".join(wrong)
                + "; build the loader with the settings it was saved with"
            )
        self._step = _check_int("state['step']", state.get("step"), low=0)


def _check_int(name: str, value: Any, *, low: int) -> int:
    """Returns ``value`` as a Python int, or raises ``ValueError`` naming ``name``."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return number
