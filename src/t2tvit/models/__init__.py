"""Every T2T-ViT of the paper, registered in timm on import."""
from .t2t_vit import MODEL_CONFIGS, PAPER_RESULTS, Block, T2TViT, create_t2t_vit

__all__ = ['MODEL_CONFIGS', 'PAPER_RESULTS', 'Block', 'T2TViT', 'create_t2t_vit']
