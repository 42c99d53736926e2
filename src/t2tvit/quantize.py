"""int8 inference: the backbone's Linear layers with int8 weights and dynamically quantized activations.

- PyTorch: :func:`quantize_int8` applies ``torch.ao.quantization.quantize_dynamic`` (x86 kernels,
  per-tensor int8 weights, activations quantized per batch at run time) to the Transformer blocks
  and the head, about 95% of T2T-ViT-14's MACs. The T2T stem stays float32: its soft splits read the
  projection weights as convolutions, and the Performer's exponential features need the precision.
- ONNX: :func:`quantize_onnx_int8` runs onnxruntime's ``quantize_dynamic`` on an exported file, for
  the MatMul/Gemm nodes with constant weights after the stem's last convolution (the blocks and the
  head).

Both are inference only (``t2tvit benchmark --dtype int8``, ``t2tvit export --quantize int8``); the
top-1 class agrees with float32 on the fixtures and on digits (tests/test_fast.py).
"""
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

BACKBONE_MODULES = ('blocks', 'head')


def quantize_int8(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose block and head Linear layers run in int8 (CPU)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    if 'x86' in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = 'x86'
    names = [name for name in BACKBONE_MODULES if isinstance(getattr(model, name, None), nn.Module)]
    if not names:
        raise UserError('int8: the model has no `blocks` or `head` to quantize')
    spec = {name: default_dynamic_qconfig for name in names}
    with warnings.catch_warnings():
        # torch marks its quantized tensor types deprecated; the x86 dynamic kernels are what it ships today
        warnings.filterwarnings('ignore', message='.*quantize_per_tensor', category=UserWarning)
        return quantize_dynamic(copy.deepcopy(model).eval().cpu(), spec, dtype=torch.qint8)


def quantize_onnx_int8(src: str | Path, dst: str | Path) -> Path:
    """Write ``dst``: ``src`` with the weights of the blocks' and head's MatMul/Gemm nodes in int8."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model = onnx.load(str(src))
    graph = model.graph
    source = _fold_weight_transposes(graph)
    constants = {init.name for init in graph.initializer}
    # the exporter names each weight after its parameter (a folded transpose after the one it read): the
    # backbone's MatMul/Gemm nodes are those reading a blocks.* or head.* weight, whatever the stem exports as
    prefixes = tuple(f'{name}.' for name in BACKBONE_MODULES)
    nodes = [node.name for node in graph.node if node.op_type in ('MatMul', 'Gemm')
             and any(i in constants and source.get(i, i).startswith(prefixes) for i in node.input)]
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / 'folded.onnx'
        onnx.save(model, str(folded))
        quantize_dynamic(str(folded), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=['MatMul', 'Gemm'],
                         nodes_to_quantize=nodes)
    return Path(dst)


def _fold_weight_transposes(graph) -> dict[str, str]:
    """Replace ``Transpose(weight)`` nodes by transposed weights (the quantizer only sees constant inputs);
    returns each folded weight's name -> the name of the weight it was made from."""
    from onnx import numpy_helper
    inits = {init.name: init for init in graph.initializer}
    keep, source = [], {}
    for node in graph.node:
        if node.op_type == 'Transpose' and node.input[0] in inits:
            source[node.output[0]] = node.input[0]
            perm = [list(a.ints) for a in node.attribute if a.name == 'perm']
            array = numpy_helper.to_array(inits[node.input[0]])
            array = array.transpose(perm[0]) if perm else array.T
            graph.initializer.append(numpy_helper.from_array(array.copy(), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return source
