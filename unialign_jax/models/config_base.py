"""JSON round trip for the models' frozen configuration dataclasses (stored in checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any


class JsonConfig:
    """Mixin for a frozen dataclass: `to_dict()` and a `from_dict()` that names unknown fields."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)
