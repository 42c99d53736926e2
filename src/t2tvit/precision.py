"""How a model runs inference: its dtype, and the fast stem paths (one set of rules for every command).

``t2tvit predict``, ``validate``, ``serve`` and ``benchmark`` take the same flags and mean the same by them:

- ``--dtype bf16`` / ``fp16``: autocast over the float32 weights; with ``--cast-weights`` the weights are
  cast once (a copy, ``model.to(torch.bfloat16)``) and the input with them, no per-call casts. The stem's
  normalisation and the Performer's random features stay float32 either way.
- ``--dtype int8``: the blocks' and head's Linear layers dynamically quantized (``quantize.quantize_int8``,
  PyTorch's x86 kernels: CPU only).
- ``--fused-stem``: each soft split + LayerNorm + projection as one strided convolution
  (``T2TViT.set_fused_stem``); ``--compile-stem``: the T2T stem through ``torch.compile``, the blocks eager
  (``T2TViT.set_compiled_stem``); ``--compile``: the whole model through ``torch.compile`` with inductor's
  freezing (the weights folded into the graph as constants, oneDNN's prepacked matmuls): the fastest bf16 path
  measured on a 2-core AMD EPYC (AVX512-BF16, no AMX), 1.18x the eager model with the weights cast once and
  the fused stem (the stem alone compiled: 1.08x; without freezing, the whole model 1.07x).

:meth:`InferencePrecision.prepare` leaves the weights and flags of the model it is given as they were (a
server still draws its explain pictures with the float32 model), and :meth:`InferencePrecision.logits` runs
a batch the same way wherever it is called.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
INFER_DTYPES = ('fp32', *AUTOCAST_DTYPES, 'int8')


@dataclass(frozen=True)
class InferencePrecision:
    dtype: str = 'fp32'
    cast_weights: bool = False
    fused_stem: bool = False
    compile_stem: bool = False
    compile: bool = False

    @classmethod
    def from_args(cls, args) -> 'InferencePrecision':
        """From the command line's --dtype (None: fp32), --cast-weights, --fused-stem, --compile-stem, --compile."""
        return cls(args.dtype or 'fp32', args.cast_weights, args.fused_stem, args.compile_stem, args.compile)

    @property
    def plain(self) -> bool:
        """float32 (or autocast) through the reference stem, eager: the model runs as it is."""
        return self.dtype in ('fp32', *AUTOCAST_DTYPES) and not (self.cast_weights or self.fused_stem
                                                                 or self.compile_stem or self.compile)

    @property
    def compiles(self) -> bool:
        """Whether the first batch (and the first of another size) compiles."""
        return self.compile or self.compile_stem

    @property
    def input_dtype(self) -> torch.dtype:
        return AUTOCAST_DTYPES[self.dtype] if self.cast_weights else torch.float32

    def check(self, device: str | torch.device = 'cpu') -> 'InferencePrecision':
        """Raise a UserError naming the flag to change when the combination cannot run on ``device``."""
        device = torch.device(device)
        if self.dtype not in INFER_DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not one of {', '.join(INFER_DTYPES)}")
        if self.dtype == 'int8' and device.type != 'cpu':
            raise UserError('--dtype int8 runs on the CPU (PyTorch\'s x86 kernels): add --device cpu, '
                            'or use --dtype bf16 on the GPU')
        if self.cast_weights and self.dtype not in AUTOCAST_DTYPES:
            raise UserError('--cast-weights casts the weights for bf16/fp16 inference: add --dtype bf16')
        if self.compiles and self.dtype == 'int8':
            raise UserError('--compile and --compile-stem are for float and bf16 models: drop them with --dtype int8')
        if self.compile and self.compile_stem:
            raise UserError('--compile compiles the whole model, stem included: drop --compile-stem')
        if self.compiles and device.type == 'cpu':
            require_cxx_compiler('--compile-stem' if self.compile_stem else '--compile')
        return self

    def describe(self) -> str:
        """``bf16 (weights cast once), fused stem`` and the like, for a command's report."""
        words = [self.dtype + (' (weights cast once)' if self.cast_weights else
                               ' (autocast)' if self.dtype in AUTOCAST_DTYPES else '')]
        words += [name for name, on in (('fused stem', self.fused_stem), ('compiled stem', self.compile_stem),
                                        ('compiled (frozen)', self.compile)) if on]
        return ', '.join(words)

    def as_json(self) -> dict:
        return {'dtype': self.dtype, 'cast_weights': self.cast_weights, 'fused_stem': self.fused_stem,
                'compile_stem': self.compile_stem, 'compile': self.compile}

    def prepare(self, model: nn.Module, device: str | torch.device = 'cpu', name: str = '') -> nn.Module:
        """``model`` ready to run this way, in eval mode on ``device``: ``model`` itself when nothing changes
        (float32 or autocast through the reference stem), else a copy with the weights cast or quantized and
        the stem flags set (``compile``: that copy inside ``torch.compile``; it compiles on its first call)."""
        device = torch.device(device)
        self.check(device)
        model = model.eval().to(device)
        if self.plain:
            return model
        name = name or type(model).__name__
        if self.fused_stem or self.compile_stem:
            stems = [m for m in model.modules() if hasattr(m, 'fused_split')]
            if not stems:
                raise UserError(f'{name} has no T2T stem: drop --fused-stem / --compile-stem')
            if self.fused_stem and not any(m.fusable for m in stems):
                raise UserError(f'{name}: its T2T stem has no soft split to fuse (convolutional T2T or the '
                                'reference attention): drop --fused-stem')
        if self.dtype == 'int8':
            from .quantize import quantize_int8
            fast = quantize_int8(model)  # a copy; int8 kernels are the CPU's
        else:
            fast = copy.deepcopy(model)
            if self.cast_weights:
                fast = fast.to(AUTOCAST_DTYPES[self.dtype])
        if self.fused_stem:
            fast.set_fused_stem(True)
        if self.compile_stem:
            fast.set_compiled_stem(True)
        fast.eval()
        if self.compile:
            # freezing folds the weights in as constants: inference only (autograd off), which logits() ensures
            return torch.compile(fast, fullgraph=True, options={'freezing': True})
        return fast

    def autocast(self, device: str | torch.device):
        device = torch.device(device)
        if self.dtype in AUTOCAST_DTYPES and not self.cast_weights:
            return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[self.dtype])
        return contextlib.nullcontext()

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model`` (from :meth:`prepare`) on the float32 batch ``x``: float32 logits, no autograd."""
        with torch.inference_mode(), self.autocast(x.device):
            return model(x.to(self.input_dtype)).float()


def require_cxx_compiler(flag: str = '--compile'):
    """Raise a UserError before compiling when inductor finds no C++ compiler for its CPU kernels (its own
    search: ``torch._inductor.config.cpp.cxx``, g++ by default), instead of a traceback on the first batch."""
    try:
        from torch._inductor import cpp_builder, exc
        missing = exc.InvalidCxxCompiler
    except ImportError:  # another torch layout: let the first call say what it needs
        return
    try:
        cpp_builder.get_cpp_compiler()
    except missing:
        raise UserError(f'{flag} builds C++ kernels for the CPU and found no C++ compiler: install g++ '
                        f'(apt-get install g++) or set CXX, or drop {flag}') from None
