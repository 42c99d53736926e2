"""Memory-lean training steps: keep the inputs of cheap element-wise ops, not their outputs.

In a pre-norm Transformer layer autograd keeps, for backward, the input of each LayerNorm
(for the norm's own gradient) *and* its output (for the weight gradient of the Linear that
reads it), and the input of GELU *and* its output (for the weight gradient of ``fc2``). Each
of those outputs is one element-wise pass away from a tensor that is kept anyway, so keeping
it costs memory for nothing. :class:`LeanSaving` is a ``saved_tensors_hooks`` context: an
output registered with :meth:`LeanSaving.cheap` is stored as "run this op on these inputs
again" when autograd saves it, and rebuilt when backward needs it. Outputs, gradients and
dropout masks are bit for bit those of plain autograd (the same kernel on the same input).

On ``t2t_vit_t_14`` (224 px, batch 16, fp32, CPU) this takes a training step's peak memory from
1170 MB to 774 MB at the same speed (benchmarks/RESULTS.md); on the 0.6M-parameter 32 px demo
model, where the element-wise ops are a larger share, the recomputation costs about 7% of a step.
It is on by default in training; ``model.set_lean_activations(False)`` (``--activations plain``)
gives plain autograd. It steps aside where another mechanism owns the saved tensors: gradient
checkpointing (ours or a caller's ``torch.utils.checkpoint``), ``save_on_cpu`` or any other
saved-tensor hooks already active, ``torch.compile`` (whose partitioner makes the same
recompute choice itself), TorchScript, fx and jit tracing. Recipes call ``module.forward``, so
a caller's forward hooks on a LayerNorm or GELU see each forward once, not again in backward.

Under autocast a Linear saves its low-precision copy of the normalised tokens, not the
float32 tensor LayerNorm returns; :meth:`LeanSaving.norm` therefore makes that cast itself
(exactly as autocast would, autocast then leaves the tensor alone) and registers the copy.
"""
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing


def _other_saving_hooks() -> bool:
    """Whether saved-tensor hooks are already active: checkpointing, ``save_on_cpu`` offloading, a user's."""
    top = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)
    return top is not None and top(False) is not None


def lean_saving_applies(module: nn.Module) -> bool:
    """Whether ``module`` (its ``lean`` switch on) is recorded by plain eager autograd for a training step,
    with no other mechanism owning the saved tensors (inner hooks would take them from an outer checkpoint)."""
    return (getattr(module, 'lean', True) and module.training and torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not is_fx_symbolic_tracing() and not _other_saving_hooks())


class _Recipe:
    """How to rebuild one saved tensor: the op, its inputs, the autocast state, the saved view."""

    __slots__ = ('fn', 'args', 'autocast', 'size', 'stride', 'offset')

    def __init__(self, fn: Callable, args: tuple, autocast: Tuple[str, bool, torch.dtype],
                 registered: torch.Tensor, saved: torch.Tensor):
        self.fn, self.args, self.autocast = fn, args, autocast
        # the saved tensor may be a view of the registered output (Linear flattens its input)
        self.size, self.stride = saved.size(), saved.stride()
        self.offset = saved.storage_offset() - registered.storage_offset()

    def rebuild(self) -> torch.Tensor:
        device_type, enabled, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out = self.fn(*self.args)
        return out.as_strided(self.size, self.stride, out.storage_offset() + self.offset)


def _autocast_state(device_type: str) -> Tuple[str, bool, torch.dtype]:
    if not torch.amp.is_autocast_available(device_type):
        return device_type, False, torch.float32
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class LeanSaving(torch.autograd.graph.saved_tensors_hooks):
    """Within the context, registered outputs are saved for backward as recipes, not as tensors."""

    def __init__(self):
        # storage address -> (the registered output, kept alive so that no other tensor can reuse
        # the address while the context is open; its op; the op's inputs)
        self._registered: Dict[int, Tuple[torch.Tensor, Callable, tuple]] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> 'LeanSaving':
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._registered.clear()

    def cheap(self, out: torch.Tensor, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        """Register ``out == fn(*args)``: wherever autograd saves it, save the recipe instead."""
        self._registered[out.untyped_storage().data_ptr()] = (out, fn, args)
        return out

    def norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``norm(x)`` for one Linear layer to read, cast as autocast would cast it for that layer.

        One reader only: autocast casts separately for each reader, and their gradients then meet
        in float32, where a shared cast would add them in low precision.
        """
        _, enabled, dtype = _autocast_state(x.device.type)
        y = norm(x)
        if enabled and y.dtype != dtype and y.dtype in (torch.float32, torch.float64):
            def fn(t: torch.Tensor) -> torch.Tensor:
                return norm.forward(t).to(dtype)
            return self.cheap(y.to(dtype), fn, x)
        return self.cheap(y, norm.forward, x)

    def mlp(self, fc1: nn.Module, act: nn.Module, rest: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor) -> torch.Tensor:
        """``rest(act(fc1(x)))`` with ``act``'s output registered (``rest`` starts with ``fc2``)."""
        h = fc1(x)
        return rest(self.cheap(act(h), act.forward, h))

    def _pack(self, t: torch.Tensor) -> Any:
        try:
            entry = self._registered.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return t
        if entry is None or entry[0].dtype != t.dtype:
            return t
        registered, fn, args = entry
        return _Recipe(fn, args, _autocast_state(t.device.type), registered, t)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.rebuild() if isinstance(packed, _Recipe) else packed


def timm_mlp(lean: LeanSaving, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` (fc1, act, drop1, norm, fc2, drop2) with the activation's output registered."""
    return lean.mlp(mlp.fc1, mlp.act, lambda g: mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(g)))), x)
