"""The Performer layer of the T2T module (linear attention with positive random features).

Reference semantics kept for parity with the released weights:
- one ``kqv`` projection *with* bias, split in the order k, q, v;
- a fixed random-feature matrix ``w`` (m = kernel_ratio * emb rows, orthogonal rows
  scaled by sqrt(m)) saved in the state dict and never trained;
- features ``exp(w^T x - |x|^2 / 2) / sqrt(m)``, the normaliser ``D + 1e-8``;
- the skip connection through ``v`` (input and output widths differ), dropout 0.1 after
  the projection and at the end of the MLP (``dp1``/``dp2``).

The random features are always computed in float32, even under bf16/fp16 autocast:
``exp`` of a low-precision argument overflows or loses the kernel's positivity.
"""
import math

import torch
import torch.nn as nn

from .attention import check_attn_impl


class TokenPerformer(nn.Module):
    def __init__(
            self,
            dim: int,
            in_dim: int,
            kernel_ratio: float = 0.5,
            dp1: float = 0.1,
            dp2: float = 0.1,
            attn_impl: str = 'sdpa',
    ):
        super().__init__()
        self.emb = in_dim
        self.m = int(in_dim * kernel_ratio)
        self.epsilon = 1e-8
        self.attn_impl = check_attn_impl(attn_impl)
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb),
            nn.GELU(),
            nn.Linear(self.emb, self.emb),
            nn.Dropout(dp2),
        )
        w = nn.init.orthogonal_(torch.empty(self.m, self.emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, emb) -> (B, T, m) positive random features, float32."""
        x = x.float()
        w = self.w.float()
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        wtx = torch.matmul(x, w.t())
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def linear_attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)
        vf = v.float()
        if self.attn_impl == 'naive':
            # the reference einsum/repeat formulation
            D = torch.einsum('bti,bi->bt', qp, kp.sum(dim=1)).unsqueeze(dim=2)
            kptv = torch.einsum('bin,bim->bnm', vf, kp)
            y = torch.einsum('bti,bni->btn', qp, kptv) / (D.repeat(1, 1, self.emb) + self.epsilon)
        else:
            D = torch.matmul(qp, kp.sum(dim=1).unsqueeze(-1))  # (B, T, 1)
            kptv = torch.matmul(kp.transpose(1, 2), vf)  # (B, m, emb)
            y = torch.matmul(qp, kptv) / (D + self.epsilon)
        y = y.to(v.dtype)
        return v + self.dp(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))
