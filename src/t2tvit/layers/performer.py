"""The Performer layer of the T2T module (linear attention with positive random features).

Reference semantics kept for parity with the released weights:
- one ``kqv`` projection *with* bias, split in the order k, q, v;
- a fixed random-feature matrix ``w`` (m = kernel_ratio * emb rows, orthogonal rows
  scaled by sqrt(m)) saved in the state dict and never trained;
- features ``exp(w^T x - |x|^2 / 2) / sqrt(m)``, the normaliser ``D + 1e-8``;
- the skip connection through ``v`` (input and output widths differ), dropout 0.1 after
  the projection and at the end of the MLP (``dp1``/``dp2``).

The random features and the linear attention built from them are always computed in
float32, even under bf16/fp16 autocast: ``exp`` of a low-precision argument overflows or
loses the kernel's positivity, and the normaliser sums thousands of such terms.
:func:`performer_attention` switches autocast off locally; it is a leaf for
``torch.fx`` and traces as one region for ``torch.compile(fullgraph=True)``.
"""
import math

import torch
import torch.fx
import torch.nn as nn

from .attention import check_attn_impl
from .dropout import Dropout
from .lean import LeanSaving, lean_saving_applies


def _random_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, T, emb) -> (B, T, m): ``exp(w x - |x|^2 / 2) / sqrt(m)`` in the dtype of ``x``."""
    xd = (x * x).sum(dim=-1, keepdim=True) / 2
    return torch.exp(torch.matmul(x, w.t()) - xd) / math.sqrt(w.shape[0])


def _random_features_lean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``_random_features`` in two passes over the (B, T, m) features: the norm without an (B, T, emb)
    square, the 1 / sqrt(m) folded into the exponent (``exp(a) / s == exp(a - log s)``)."""
    xd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / 2 + 0.5 * math.log(w.shape[0])
    return torch.exp(torch.matmul(x, w.t()) - xd)


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                      epsilon: float, naive: bool) -> torch.Tensor:
    if naive:
        # the reference einsum/repeat formulation
        kp, qp = _random_features(k, w), _random_features(q, w)
        D = torch.einsum('bti,bi->bt', qp, kp.sum(dim=1)).unsqueeze(dim=2)
        kptv = torch.einsum('bin,bim->bnm', v, kp)
        return torch.einsum('bti,bni->btn', qp, kptv) / (D.repeat(1, 1, v.shape[-1]) + epsilon)
    kp, qp = _random_features_lean(k, w), _random_features_lean(q, w)
    D = torch.matmul(qp, kp.sum(dim=1).unsqueeze(-1))  # (B, T, 1)
    kptv = torch.matmul(kp.transpose(1, 2), v)  # (B, m, emb)
    return torch.matmul(qp, kptv) / (D + epsilon)


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                        epsilon: float = 1e-8, naive: bool = False) -> torch.Tensor:
    """phi(q) (phi(k)^T v) / (phi(q) phi(k)^T 1 + epsilon) over (B, T, emb) inputs, as float32."""
    if torch.jit.is_scripting():
        # TorchScript can neither switch autocast off nor safely ask whether it is on (scripted
        # torch.is_autocast_cpu_enabled() segfaults under autocast in torch 2.14); a float32 product
        # that comes back in low precision says it is on, and autocast leaves float64 alone
        w32 = w[:1].float()
        if torch.matmul(w32, w32.t()).dtype != torch.float32:
            return _linear_attention(q.double(), k.double(), v.double(), w.double(), epsilon, naive).float()
        return _linear_attention(q.float(), k.float(), v.float(), w.float(), epsilon, naive)
    if torch.amp.is_autocast_available(q.device.type) and torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return _linear_attention(q.float(), k.float(), v.float(), w.float(), epsilon, naive)
    # no context manager without autocast, so exported graphs (ONNX, torch.export) stay plain
    return _linear_attention(q.float(), k.float(), v.float(), w.float(), epsilon, naive)


# fx keeps the call as one node, so autocast is switched off when the traced graph runs
torch.fx.wrap('performer_attention')


class TokenPerformer(nn.Module):
    # buffers the reference holds as frozen Parameters; `t2tvit profile` counts them as it does
    reference_parameters = ('w',)

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
        self.dp = Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb),
            nn.GELU(),
            nn.Linear(self.emb, self.emb),
            Dropout(dp2),
        )
        # a persistent buffer, not a frozen Parameter: it is never trained, so optimizers and gradient
        # checks (timm's model tests) need not skip it; the state-dict key ``w`` and its place stay the reference's
        w = nn.init.orthogonal_(torch.empty(self.m, self.emb)) * math.sqrt(self.m)
        self.register_buffer('w', w)
        self.lean = True  # see layers/lean.py

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, emb) -> (B, T, m) positive random features, float32."""
        return _random_features(x.float(), self.w.float())

    def linear_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.kqv(x))

    def attend(self, kqv: torch.Tensor) -> torch.Tensor:
        """The layer's attention from its ``kqv`` projection (B, T, 3 * emb)."""
        k, q, v = torch.split(kqv, self.emb, dim=-1)
        y = performer_attention(q, k, v, self.w, self.epsilon, self.attn_impl == 'naive')
        return v + self.dp(self.proj(y.to(v.dtype)))

    @torch.jit.unused
    def forward_projected(self, kqv: torch.Tensor) -> torch.Tensor:
        """``forward`` from ``kqv(norm1(x))``, which the T2T module's fused soft split computes."""
        if lean_saving_applies(self):
            with LeanSaving() as lean:
                x = self.attend(kqv)
                fc1, act, fc2, drop = self.mlp
                return x + lean.mlp(fc1, act, lambda g: drop(fc2(g)), lean.norm(self.norm2, x))
        x = self.attend(kqv)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if lean_saving_applies(self):
                return self.forward_lean(x)
        x = self.linear_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    @torch.jit.unused
    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        with LeanSaving() as lean:
            x = self.linear_attention(lean.norm(self.norm1, x))
            fc1, act, fc2, drop = self.mlp
            return x + lean.mlp(fc1, act, lambda g: drop(fc2(g)), lean.norm(self.norm2, x))
