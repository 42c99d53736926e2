"""Export for deployment: ONNX, TorchScript and ``torch.export`` programs.

- ``onnx``: ``torch.onnx.export`` with the ``torch.export``-based exporter, opset 17 or
  newer, weights inside the file; runs in onnxruntime (``OnnxRuntimeModel``).
- ``torchscript``: ``torch.jit.script`` (every shape stays dynamic), ``torch.jit.save``.
- ``exported``: a ``torch.export`` program (``.pt2``), ``torch.export.load(path).module()``.
- ``openvino``: OpenVINO IR (``.xml`` with its ``.bin`` weights beside it, float32), converted from the
  PyTorch model by ``openvino.convert_model``; runs in OpenVINO's CPU runtime (``OpenVinoModel``) with
  float32 inference precision (on CPUs with bf16 units OpenVINO would otherwise pick bf16).

The model is exported in eval mode with float32 weights. ``dynamic_batch`` makes the batch
dimension symbolic (``torch.export.Dim``); otherwise the file is specialised to batch 1.
The image size is always fixed: the position table is sized for one token grid.
:func:`max_abs_diff` runs an exported file against PyTorch, as ``t2tvit export`` does after
writing it.
"""
import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

FORMATS = {'onnx': '.onnx', 'torchscript': '.pt', 'exported': '.pt2', 'openvino': '.xml'}
MIN_OPSET = 17
DEFAULT_OPSET = 18
TOLERANCE = 1e-4


def _example(model: nn.Module, img_size: int | None, dynamic_batch: bool) -> torch.Tensor:
    height, width = (img_size, img_size) if img_size else tuple(model.img_size)
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced with 2
    return torch.randn(2 if dynamic_batch else 1, 3, height, width)


@contextlib.contextmanager
def _torchscript():
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated; the format is still what C++ and mobile runtimes load
        warnings.simplefilter('ignore', FutureWarning)
        yield


def _batch_dim():
    return {0: torch.export.Dim('batch', min=1, max=4096)}


def export_model(model: nn.Module, fmt: str, out: str | Path, img_size: int | None = None,
                 dynamic_batch: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (eval mode) to ``out`` in ``fmt`` ('onnx', 'torchscript' or 'exported')."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt == 'onnx' and opset < MIN_OPSET:
        raise ValueError(f'ONNX opset {opset} is too old: use {MIN_OPSET} or newer')
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = _example(model, img_size, dynamic_batch)
    if fmt == 'onnx':
        # optimize=False: onnxscript's optimizer (0.7) takes `x + c` for `x` when |c| <= 1e-8, which drops
        # the Performer's epsilon and turns all-underflow tokens into 0/0; onnxruntime optimizes on load anyway
        program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=opset, input_names=['images'], output_names=['logits'],
            dynamic_shapes=(_batch_dim(),) if dynamic_batch else None, external_data=False, verbose=False,
            optimize=False)
        program.save(str(out), external_data=False)
    elif fmt == 'torchscript':
        with _torchscript():
            torch.jit.save(torch.jit.script(model), str(out))
    elif fmt == 'openvino':
        ov = _openvino()
        ir = ov.convert_model(model, example_input=x)
        if not dynamic_batch:
            ir.reshape([1, *x.shape[1:]])
        ov.save_model(ir, str(out), compress_to_fp16=False)
    else:
        program = torch.export.export(model, (x,), dynamic_shapes=(_batch_dim(),) if dynamic_batch else None)
        torch.export.save(program, str(out))
    return out


class OnnxRuntimeModel:
    """An ONNX file in an onnxruntime CPU session, called like a model: (B, 3, H, W) -> logits."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(logits)


def _openvino():
    try:
        import openvino
    except ImportError:
        raise UserError('--format openvino needs the openvino package: pip install "t2tvit[openvino]"') from None
    return openvino


class OpenVinoModel:
    """An OpenVINO IR file compiled for the CPU with float32 precision, called like a model."""

    def __init__(self, path: str | Path):
        ov = _openvino()
        self.compiled = ov.Core().compile_model(str(path), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.detach().cpu().numpy())[0].copy())


def load_exported(path: str | Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that runs an exported file: onnxruntime, ``torch.jit.load``, ``torch.export.load`` or OpenVINO."""
    if fmt == 'onnx':
        return OnnxRuntimeModel(path)
    if fmt == 'openvino':
        return OpenVinoModel(path)
    if fmt == 'torchscript':
        with _torchscript():
            return torch.jit.load(str(path)).eval()
    return torch.export.load(str(path)).module()


def max_abs_diff(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Largest absolute difference between the logits of ``model`` and of ``exported`` on ``x``."""
    with torch.no_grad():
        return (model.eval()(x) - exported(x)).abs().max().item()


def export_cli(model: str | None, checkpoint: str | None, fmt: str, out: str | None,
               img_size: int | None, dynamic_batch: bool, opset: int = DEFAULT_OPSET, verify: bool = True,
               quantize: str | None = None) -> int:
    """``t2tvit export``: build, write, and compare the file's logits with PyTorch's."""
    from .factory import UnknownModelError, create_model
    if model is None and checkpoint is None:
        raise UserError('give --model NAME, or --checkpoint PATH of a t2tvit checkpoint')
    if fmt == 'onnx' and opset < MIN_OPSET:
        raise UserError(f'--opset {opset}: ONNX export needs opset {MIN_OPSET} or newer')
    if quantize not in (None, 'int8'):
        raise UserError(f'--quantize {quantize!r}: the one quantization is int8')
    if quantize and fmt != 'onnx':
        raise UserError(f'--quantize int8 writes ONNX (onnxruntime quantization): use --format onnx, not {fmt}')
    kwargs = {'img_size': img_size} if img_size else {}
    try:
        net = create_model(model, checkpoint_path=checkpoint, **kwargs).eval()
    except UnknownModelError as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # an image size the model's geometry cannot tile
        raise UserError(f'--img-size {img_size}: {e}') from None
    name = model or getattr(net, 't2tvit_config', {}).get('model', 'model')
    path = Path(out or f'{name}{FORMATS[fmt]}')
    if fmt == 'exported' and path.suffix != '.pt2':
        raise UserError(f'-o {path}: torch.export.load reads programs from files ending in .pt2')
    if fmt == 'openvino':
        _openvino()
        if path.suffix != '.xml':
            raise UserError(f'-o {path}: OpenVINO IR is an .xml file (its weights go to the .bin beside it)')
    if quantize:
        import tempfile

        from .quantize import quantize_onnx_int8
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_model(net, fmt, Path(tmp) / path.name, img_size=img_size, dynamic_batch=dynamic_batch,
                                opset=opset)
            quantize_onnx_int8(fp32, path)
    else:
        export_model(net, fmt, path, img_size=img_size, dynamic_batch=dynamic_batch, opset=opset)
    print(f'wrote {path} ({fmt}{" int8" if quantize else ""}, {path.stat().st_size / 2 ** 20:.1f} MB, '
          f"{'dynamic batch' if dynamic_batch else 'batch 1'}, {net.img_size[0]}x{net.img_size[1]})")
    if not verify:
        return 0
    try:
        exported = load_exported(path, fmt)
    except ImportError:
        print('not verified: onnxruntime is not installed (pip install onnxruntime)')
        return 0
    x = torch.randn(3 if dynamic_batch else 1, 3, *net.img_size)
    if quantize:
        # int8 weights move the logits by more than float32's tolerance: the class is what must hold
        with torch.no_grad():
            ref, low = net(x), exported(x)
        same = int((ref.argmax(-1) == low.argmax(-1)).sum())
        print(f"int8 vs PyTorch float32 on a random batch of {x.shape[0]}: same top-1 {same}/{x.shape[0]}, "
              f"max |logits diff| {(ref - low).abs().max().item():.2e}")
        return 0
    diff = max_abs_diff(net, exported, x)
    ok = diff <= TOLERANCE
    print(f"max |logits - PyTorch's| on a random batch of {x.shape[0]}: {diff:.2e} "
          f"({'within' if ok else 'ABOVE'} {TOLERANCE:g})")
    return 0 if ok else 1
