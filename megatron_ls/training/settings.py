"""The run's settings: built once from the flags and the DeepSpeed JSON, then frozen.

training/arguments.py and training/ds_config.py resolve the flags (presets, defaults, what the DeepSpeed JSON
sets, the parallel layout) on an argparse Namespace; ``RunSettings.freeze`` turns the result into the one
read-only object every later part of a run reads, and ``to_dict()`` is what checkpoints record.
"""

from __future__ import annotations

import argparse
from types import MappingProxyType
from typing import Any

# Resolution bookkeeping and objects of their own, not settings a checkpoint records.
_NOT_RECORDED = ("explicit", "model", "layout")


class RunSettings:
    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    @classmethod
    def freeze(cls, args: argparse.Namespace) -> RunSettings:
        return cls(vars(args))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no run setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the run's settings are frozen (set {name!r} while resolving the flags)")

    def to_dict(self) -> dict[str, Any]:
        """The recorded settings (flag names, resolved values)."""
        return {k: v for k, v in self._values.items() if k not in _NOT_RECORDED and not k.startswith("_")}
