"""t2tvit: the Tokens-to-Token Vision Transformer (Yuan et al., ICCV 2021) for the timm ecosystem.

``import t2tvit`` registers every model in timm, so ``timm.create_model('t2t_vit_14')`` works.
"""
from . import models  # noqa: F401  (registers the models in timm)
from .checkpoint import load_checkpoint, save_model
from .factory import create_model, create_model_from_checkpoint, list_models

__version__ = '0.1.0'
__all__ = ['__version__', 'create_model', 'create_model_from_checkpoint', 'list_models', 'load_checkpoint',
           'save_model']
