"""What a pipeline stage that is not the last hands to the next one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class IntermediateTensors:
    """Hidden states and residual [T, hidden] after a stage's last decoder layer (before the next
    layer's input norm). Every non-last stage returns this record; the last stage returns its
    final-normed hidden states tensor.

    `FIELDS` is the order the stages send and receive them in. The record also reads as a mapping
    (`out["hidden_states"]`, `set(out)`), the form it had before it was a record.
    """

    hidden_states: torch.Tensor
    residual: torch.Tensor

    FIELDS: ClassVar[tuple[str, ...]] = ("hidden_states", "residual")

    @classmethod
    def of(cls, value: IntermediateTensors | Mapping[str, torch.Tensor]) -> IntermediateTensors:
        """The record itself, or one made from a {"hidden_states", "residual"} mapping."""
        if isinstance(value, IntermediateTensors):
            return value
        return cls(value["hidden_states"], value["residual"])

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.FIELDS)

    def __len__(self) -> int:
        return len(self.FIELDS)

    def keys(self) -> tuple[str, ...]:
        return self.FIELDS

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, getattr(self, name)) for name in self.FIELDS]
