"""Building blocks of T2T-ViT: attention, Performer, the T2T module, position tables."""
from .attention import ATTN_IMPLS, Attention, TokenAttention, scaled_attention
from .performer import TokenPerformer
from .pos_table import resize_pos_table, sinusoid_table
from .t2t import TOKEN_MIXERS, T2TModule, TokenTransformer, t2t_grids

__all__ = [
    'ATTN_IMPLS', 'Attention', 'TokenAttention', 'scaled_attention', 'TokenPerformer', 'resize_pos_table',
    'sinusoid_table', 'TOKEN_MIXERS', 'T2TModule', 'TokenTransformer', 't2t_grids',
]
