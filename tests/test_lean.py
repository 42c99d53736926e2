"""Lean activation saving: the same training step, bit for bit, in less memory."""
import contextlib
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import t2tvit
from t2tvit.analysis.benchmark import BenchmarkConfig, peak_mem_mb
from t2tvit.layers import lean

# one of each layer kind: Performer and Transformer T2T layers, SE / ghost / dense blocks, a patch stem
MODELS = ['t2t_vit_7', 't2t_vit_t_14', 't2t_vit_14_se', 't2t_vit_16_ghost', 't2t_vit_dense', 't2t_vit_14_wo_t2t']


@pytest.fixture
def rebuilt(monkeypatch):
    """Count of activations rebuilt from recipes in backward."""
    count = []
    rebuild = lean._Recipe.rebuild
    monkeypatch.setattr(lean._Recipe, 'rebuild', lambda self: count.append(1) or rebuild(self))
    return count


def _train_step(model, x, y, lean_on: bool, dtype):
    model = copy.deepcopy(model)
    model.set_lean_activations(lean_on)
    torch.manual_seed(1)  # the same dropout masks and drop paths in both runs
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16'):
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
@pytest.mark.parametrize('name', MODELS)
def test_lean_saving_gives_the_same_outputs_and_gradients(name, dtype, rebuilt):
    torch.manual_seed(0)
    size = 32 if name.startswith('t2t_vit_14_wo') else 64
    model = t2tvit.create_model(name, img_size=size, num_classes=10, drop_path_rate=0.1).train()
    x, y = torch.randn(3, 3, size, size), torch.tensor([1, 4, 9])
    out, grads = _train_step(model, x, y, True, dtype)
    assert rebuilt, 'no saved activation was recomputed: the lean path did not run'
    n_lean = len(rebuilt)
    ref_out, ref_grads = _train_step(model, x, y, False, dtype)
    assert len(rebuilt) == n_lean, 'plain saving recomputed activations'
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        assert torch.equal(grads[key], ref_grads[key]), key


def _step(model, wrap=None):
    x = torch.randn(2, 3, 32, 32)
    with wrap() if wrap else contextlib.nullcontext():
        loss = model(x).square().mean()
    loss.backward()


def test_lean_saving_steps_aside_where_other_saving_is_in_charge(rebuilt):
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_7', img_size=32).train()
    _step(model)
    assert rebuilt, 'a plain training step did not use lean saving'
    for wrap in (torch.autograd.graph.save_on_cpu,  # offloading: its hooks keep every saved tensor on the CPU
                 lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        rebuilt.clear()
        _step(model, wrap)
        assert not rebuilt
    # checkpointing, ours or a caller's, keeps only the layer's input: lean hooks inside would keep the rest
    model.set_grad_checkpointing(True)
    rebuilt.clear()
    _step(model)
    assert not rebuilt
    model.set_grad_checkpointing(False)
    rebuilt.clear()
    block = model.blocks[0]
    torch.utils.checkpoint.checkpoint(block, torch.randn(2, 5, 256, requires_grad=True),
                                      use_reentrant=False).sum().backward()
    assert not rebuilt
    model.set_lean_activations(False)
    _step(model)
    assert not rebuilt
    model.set_lean_activations(True)
    assert not lean.lean_saving_applies(model.eval())
    with torch.no_grad():
        assert not lean.lean_saving_applies(model.train())
    assert lean.lean_saving_applies(model.train())


def test_lean_training_step_needs_less_memory():
    # the kept LayerNorm and GELU outputs are about a third of a layer's activations (0.72x measured,
    # the weights' gradients included)
    cfg = BenchmarkConfig('t2t_vit_7', mode='train', batch=4, steps=1, warmup=1)
    lean_mb = peak_mem_mb(cfg)
    plain_mb = peak_mem_mb(dataclasses.replace(cfg, activations='plain'))
    assert lean_mb < 0.85 * plain_mb, (lean_mb, plain_mb)


def test_forward_hooks_see_each_forward_once():
    # feature extraction hooks on a norm or activation must not fire again when backward rebuilds
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_7', img_size=32).train()
    calls = []
    for module in (model.blocks[0].norm1, model.blocks[0].mlp.act):
        module.register_forward_hook(lambda *_: calls.append(1))
    _step(model)
    assert len(calls) == 2
