"""Every T2T-ViT of the paper, and its ablations and ViT baselines, registered in timm on import.

Each model is one entry of a table (``t2t_vit.MODELS``, ``ablations.MODELS``): config, class, paper
numbers, released weights; :mod:`t2tvit.registry` indexes them by name.
"""
from . import ablations, t2t_vit
from .t2t_vit import MODEL_CONFIGS, Block, T2TViT, create_t2t_vit

ABLATION_CONFIGS = ablations.MODEL_CONFIGS
# published (top-1 %, params M, MACs G) of every registered model the paper reports
PAPER_RESULTS = {**t2t_vit.PAPER_RESULTS, **ablations.PAPER_RESULTS}

__all__ = ['ABLATION_CONFIGS', 'MODEL_CONFIGS', 'PAPER_RESULTS', 'Block', 'T2TViT', 'create_t2t_vit']
