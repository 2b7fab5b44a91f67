"""A view of the first examples of a random-access dataset (no copy)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prefix(Sequence):
    """The first ``length`` examples of ``dataset`` (e.g. a train split before held-out data)."""

    dataset: Sequence
    length: int

    def __post_init__(self) -> None:
        if not 0 <= self.length <= len(self.dataset):
            raise ValueError(
                f"prefix of {self.length} examples from a dataset of {len(self.dataset)}"
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} examples")
        return self.dataset[index % self.length]
