"""``create_model`` / ``list_models``: timm's factory restricted to t2tvit's models, plus checkpoints."""
from typing import List, Optional

import timm
import torch.nn as nn

from .models import MODEL_CONFIGS


def list_models(pattern: str = '') -> List[str]:
    """Names of every t2tvit model (optionally filtered by an fnmatch ``pattern``)."""
    import fnmatch
    names = sorted(timm.list_models(module=['t2t_vit', 'ablations']))
    return [n for n in names if not pattern or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, checkpoint_path: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a registered model; with ``checkpoint_path`` load any supported checkpoint layout."""
    if name not in list_models():
        raise UnknownModelError(name, list_models())
    model = timm.create_model(name, **kwargs)
    if checkpoint_path:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint_path)
    return model


class UnknownModelError(ValueError):
    def __init__(self, name: str, known: List[str]):
        import difflib
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else '; run `t2tvit models` for the list'
        super().__init__(f'unknown model {name!r}{hint}')
