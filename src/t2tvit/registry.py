"""The model table's entry type and the index of every registered t2tvit model.

The models package fills the index on import (``models/t2t_vit.py`` and ``models/ablations.py`` hold
one :class:`ModelEntry` per model and register each with timm and here). What sits above the models
(checkpoint, factory, analysis) reads a model's facts here, so nothing needs to import the models back.
"""
import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ['ModelEntry', 'UnknownModelError', 'list_models', 'model_entry', 'register_entry']


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: what it is built from, what the paper reports, which weights were released."""

    config: dict[str, Any]  # constructor arguments of the model class
    model_cls: type | None = None  # None: T2TViT
    paper: tuple[float | None, float | None, float | None] | None = None  # (top-1 %, params M, MACs G)
    # tag -> release: ``file`` (the authors' file name), ``top1`` (None: the paper's), ``dataset``, and the
    # pretrained-cfg keys that differ from the model's own (classes, size, crop, mean/std)
    pretrained: dict[str, dict[str, Any]] = field(default_factory=dict)


_ENTRIES: dict[str, ModelEntry] = {}


def register_entry(name: str, entry: ModelEntry) -> None:
    _ENTRIES[name] = entry


def model_entry(name: str) -> ModelEntry:
    """The table entry of a registered model (``name`` may carry a pretrained tag)."""
    arch = name.split('.')[0]
    if arch not in _ENTRIES:
        raise UnknownModelError(arch, list_models())
    return _ENTRIES[arch]


def _natural(name: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r'(\d+)', name.lower())]


def list_models(pattern: str = '') -> list[str]:
    """Names of every t2tvit model (optionally filtered by an fnmatch ``pattern``), t2t_vit_7 before t2t_vit_10."""
    return [n for n in sorted(_ENTRIES, key=_natural) if not pattern or fnmatch.fnmatch(n, pattern)]


class UnknownModelError(ValueError):
    def __init__(self, name: str, known: list[str]):
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else '; run `t2tvit models` for the list'
        super().__init__(f'unknown model {name!r}{hint}')
