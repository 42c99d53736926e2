"""Parameters and MACs of a model (``t2tvit profile``), beside the paper's numbers.

What is counted, the convention of the reference measurements in
``../shared/fixtures/reference_params_macs.json`` (torch's ``FlopCounterMode`` run on the
authors' code):

- params: every parameter, plus the two fixed tensors the reference holds as frozen parameters and
  this code as buffers (the sinusoid table ``pos_embed`` and the Performer's random features ``w``,
  named by each module's ``reference_parameters``);
- MACs: the multiply-accumulates of matrix products and convolutions for one image (batch 1),
  ``FlopCounterMode``'s FLOPs / 2. Normalisations, softmax, activations and elementwise products
  are not counted.

How: the model is built on the meta device, so nothing is allocated or initialised, and run once
under ``FlopCounterMode``, which counts from the shapes: 0.1-0.3 s a model. A layer that cannot
run on meta tensors is run for real on the CPU, on uninitialised weights (seconds, same count).

Both attention implementations count the same. The naive path is two batched matmuls
(``q @ k^T`` and ``attn @ v``). ``F.scaled_dot_product_attention`` on CPU dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch registers no formula (it
would count 0), so :data:`SDPA_FORMULAS` gives it the two matmuls' count; torch's own formulas
cover the CUDA kernels, and on the meta device SDPA decomposes into the same matmuls. The
Performer's three matmuls and the reference's einsums decompose to the same products.

Every model of the reference file matches it: params exactly, MACs to 0.01%. The models that
exist only in the paper, against its tables (params M, MACs G):

=====================  ===============  ===============  ==========================================
model                  this code        paper            note
=====================  ===============  ===============  ==========================================
t2t_vit_c_14           21.42 / 4.59     21.3 / 4.6       Table 7
t2t_vit_14_wo_t2t      21.45 / 4.54     21.1 / 4.2       Table 7; see below
vit_s_16               48.75 / 9.89     48.6 / 10.1      Table 2 (ViT-S/16)
vit_dn                 24.41 / 5.18     24.5 / 5.5       Table 6; MLP size not published
vit_sw                 48.19 / 9.56     47.9 / 9.9       Table 6; MLP size fitted to the params
=====================  ===============  ===============  ==========================================

T2T-ViT-14 without T2T is the T2T-ViT-14 backbone (14 blocks of width 384 on 196 + 1 tokens)
on a 16x16 patch embedding. The backbone alone is 4.48G MACs, the same count that, with the T2T
module's 0.30G, gives T2T-ViT-14's 4.78G (paper: 4.8G); the patch embedding adds 0.06G. The
paper's 4.2G is below the backbone alone, so it cannot come from the counting behind its own
T2T-ViT-14 row (+8% here). Its 21.1M parameters equal T2T-ViT-14's 21.55M less the T2T module
(0.39M): the patch embedding's 0.30M seems left out (+1.6% here).

The ViT baselines count the attention matmuls too, which some counters of the time skipped;
the paper's ViT MACs are 2-6% above these counts, with no convention that fits all its rows.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..factory import create_model
from ..models import PAPER_RESULTS

PaperRow = tuple[float | None, float | None, float | None]

# Table 2 reports T2T-ViT-14 fine-tuned at 384x384 too; other sizes have no published numbers
PAPER_RESULTS_AT_SIZE: dict[tuple[str, int], PaperRow] = {
    ('t2t_vit_14', 384): (83.3, 21.5, 17.1),
}
PAPER_IMG_SIZE = 224


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v as two matmuls, for (B, heads, L, E) shapes."""
    batch, heads, q_len, qk_dim = query_shape
    kv_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * kv_len * (qk_dim + v_dim)


def _sdpa_formulas() -> dict[Callable, Callable]:
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):  # a torch without this CPU kernel
        return {}
    return {op: _sdpa_flops}


SDPA_FORMULAS = _sdpa_formulas()


@dataclass(frozen=True)
class Profile:
    model: str
    img_size: int | tuple[int, int]
    params: int
    macs: int
    paper: PaperRow | None = None

    def as_json(self) -> dict[str, object]:
        return {'model': self.model, 'img_size': self.img_size, 'params': self.params, 'macs': self.macs}


def count_params(model: nn.Module) -> int:
    """Every parameter, and every buffer the reference keeps as a frozen parameter (its count's convention)."""
    # a learned table (the ViT baselines) is a parameter, counted above: only buffers are added
    fixed = sum(module._buffers[name].numel() for module in model.modules()
                for name in getattr(module, 'reference_parameters', ()) if name in module._buffers)
    return sum(p.numel() for p in model.parameters()) + fixed


def _count_flops(model: nn.Module, img_size: tuple[int, int], in_chans: int) -> int:
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, *img_size, device=param.device, dtype=param.dtype)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_FORMULAS) as counter:
        model(x)
    return counter.get_total_flops()


def count_macs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> int:
    """Matmul and convolution multiply-adds of one forward pass at batch 1, on the model's device.

    A model on the meta device that cannot run there (a layer that needs a real device) is moved,
    uninitialised, to the CPU and run there: the same count, only slower.
    """
    if next(model.parameters()).device.type == 'meta':
        try:
            return _count_flops(model, img_size, in_chans) // 2
        except (RuntimeError, NotImplementedError):
            model.to_empty(device='cpu')
    return _count_flops(model, img_size, in_chans) // 2


def paper_results(name: str, img_size: int) -> PaperRow | None:
    """The paper's (top-1 %, params M, MACs G) for ``name`` at ``img_size``, if it publishes them."""
    if img_size == PAPER_IMG_SIZE:
        return PAPER_RESULTS.get(name)
    return PAPER_RESULTS_AT_SIZE.get((name, img_size))


def build(name: str, img_size: int | None = None, attn_impl: str = 'sdpa', device='meta') -> nn.Module:
    """The registered model ``name`` in eval mode, built on ``device`` (meta: shapes only, instant)."""
    kwargs = {'attn_impl': attn_impl}
    if img_size is not None:
        kwargs['img_size'] = img_size
    with torch.device(device):
        model = create_model(name, **kwargs)
    return model.eval()


def measure(name: str, model: nn.Module, in_chans: int = 3) -> Profile:
    """Counts of a built model at its ``img_size``; ``name`` labels them and finds the paper's numbers."""
    height, width = model.img_size
    size = height if height == width else (height, width)
    return Profile(model=name, img_size=size, params=count_params(model),
                   macs=count_macs(model, (height, width), in_chans=in_chans),
                   paper=paper_results(name, height) if height == width else None)


def profile(name: str, img_size: int | None = None, attn_impl: str = 'sdpa', device='meta') -> Profile:
    """Build ``name`` (at ``img_size``, default its configured size) and count its params and MACs."""
    return measure(name, build(name, img_size=img_size, attn_impl=attn_impl, device=device))


def format_profile(p: Profile) -> str:
    """The human-readable report of ``t2tvit profile``."""
    size = f'{p.img_size}x{p.img_size}' if isinstance(p.img_size, int) else 'x'.join(map(str, p.img_size))
    top1, paper_params, paper_macs = p.paper or (None, None, None)
    lines = [f'{p.model} at {size}, batch 1']
    lines.append(f'  params {p.params:>16,}  {p.params / 1e6:7.2f} M'
                 + (f'    paper {paper_params} M' if paper_params is not None else ''))
    lines.append(f'  MACs   {p.macs:>16,}  {p.macs / 1e9:7.2f} G'
                 + (f'    paper {paper_macs} G' if paper_macs is not None else ''))
    if top1 is not None:
        lines.append(f'  top-1  paper {top1} % (ImageNet val)')
    return '\n'.join(lines)
