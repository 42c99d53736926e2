"""Low precision and compilation keep the numbers: the Performer stays float32 under autocast,
bf16 keeps the reference's top-1, bf16 training stays finite, compiled and traced models match eager."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import t2tvit
from conftest import fixture_model, load_json
from t2tvit.layers import performer
from t2tvit.layers.performer import _linear_attention
from t2tvit.models import PAPER_RESULTS


class PerformerCore(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.register_buffer('w', w)

    def forward(self, q, k, v):
        # called through its module, where torch.fx.wrap made it a leaf
        return performer.performer_attention(q, k, v, self.w)


@pytest.fixture(scope='module')
def performer_inputs():
    torch.manual_seed(0)
    # a T2T layer's shapes and scales: 256 tokens of width 64, 32 random features
    q, k, v = (torch.randn(2, 256, 64) * 0.5 for _ in range(3))
    w = torch.nn.init.orthogonal_(torch.empty(32, 64)) * 32 ** 0.5
    exact = _linear_attention(q.double(), k.double(), v.double(), w.double(), 1e-8, False)
    return q, k, v, w, exact


@pytest.mark.parametrize('wrap', ['eager', 'script', 'fx', 'compile'])
def test_performer_attention_stays_float32_under_bf16_autocast(performer_inputs, wrap):
    q, k, v, w, exact = performer_inputs
    core = PerformerCore(w)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated in torch
        fn = {'eager': lambda m: m, 'script': torch.jit.script, 'fx': torch.fx.symbolic_trace,
              'compile': lambda m: torch.compile(m, fullgraph=True)}[wrap](core)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = fn(q, k, v)
        unguarded = _linear_attention(q, k, v, w, 1e-8, False)
    assert y.dtype == torch.float32
    scale = exact.abs().max().item()
    assert (y.double() - exact).abs().max().item() < 1e-5 * scale
    # the check means something: the same math left to autocast is far off
    assert (unguarded.double() - exact).abs().max().item() > 1e-3 * scale


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_bf16_keeps_the_reference_top1(name, fixtures_dir, official_ckpt):
    expected = load_json(fixtures_dir / f'{name}.expected.json')
    model = fixture_model(name, fixtures_dir, official_ckpt)
    x = torch.from_numpy(official_ckpt.make_inputs(expected['input']['batch'], expected['input']['size']))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(x).float()
    assert logits.argmax(dim=-1).tolist() == [top5[0] for top5 in expected['top5']]
    torch.testing.assert_close(logits, torch.tensor(expected['logits']), atol=0.1, rtol=0)


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_bf16_autocast_training_stays_finite(name):
    torch.manual_seed(0)
    model = t2tvit.create_model(name, img_size=64, num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64) * 3, torch.randint(0, 10, (4,))
    for _ in range(2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_script_and_fx_match_eager():
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_7', img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        scripted = torch.jit.script(model)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ref = model(x)
        for fn in (scripted, traced):
            torch.testing.assert_close(fn(x), ref, atol=1e-4, rtol=0)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                assert torch.isfinite(fn(x)).all()


def _check_compiled(model, x):
    # a fresh dynamo cache: each model's blocks would otherwise count as recompiles of the last one's
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=0)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    _check_compiled(t2tvit.create_model('t2t_vit_7', img_size=32).eval(), torch.randn(2, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(PAPER_RESULTS))
def test_compile_fullgraph_matches_eager_every_paper_model(name, fixtures_dir, official_ckpt):
    model = fixture_model(name, fixtures_dir, official_ckpt)
    _check_compiled(model, torch.from_numpy(official_ckpt.make_inputs(2, model.img_size[0])))


def test_naive_attention_is_the_reference_order_of_operations():
    # the benchmarks' baseline must be the reference math itself: the backbone scales q k^T,
    # the T2T Transformer layer scales q before the product (float rounding tells them apart)
    from t2tvit.layers import Attention, TokenAttention
    torch.manual_seed(0)
    token = TokenAttention(147, 64, attn_impl='naive').eval()
    backbone = Attention(64, num_heads=2, attn_impl='naive').eval()
    x = torch.randn(2, 49, 147)
    with torch.no_grad():
        q, k, v = token.qkv_heads(x)
        attn = ((q * token.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = token.proj((attn @ v).transpose(1, 2).reshape(2, 49, 64))
        assert torch.equal(token(x), v.squeeze(1) + y)
        h = torch.randn(2, 49, 64)
        q, k, v = backbone.qkv_heads(h)
        attn = ((q @ k.transpose(-2, -1)) * backbone.scale).softmax(dim=-1)
        assert torch.equal(backbone(h), backbone.proj((attn @ v).transpose(1, 2).reshape(2, 49, 64)))


@pytest.mark.parametrize('under_autocast', [False, True])
def test_short_bf16_attention_on_cpu_is_as_close_as_the_reference_math(monkeypatch, under_autocast):
    # the backbone's 197 tokens in bf16 skip torch's CPU flash kernel (slower there) for two bf16 matmuls
    # around a softmax: its result and gradients must be as close to the exact attention as the reference
    # math's under the autocast a bf16 training run uses (scores rounded to bf16, softmax in float32)
    from t2tvit.layers import attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 197, 64).bfloat16().requires_grad_() for _ in range(3))
    scale, dy = 64 ** -0.5, torch.randn(2, 6, 197, 64)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = ((qd @ kd.transpose(-2, -1)) * scale).softmax(-1) @ vd
    exact.backward(dy.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference = attention.scaled_attention(q, k, v, scale, 0.0, 'naive')
    reference_grads = torch.autograd.grad(reference, (q, k, v), dy.bfloat16())
    sdpa = attention.F.scaled_dot_product_attention
    called = []
    monkeypatch.setattr(attention.F, 'scaled_dot_product_attention',
                        lambda *a, **kw: called.append(1) or sdpa(*a, **kw))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=under_autocast):
        y = attention.scaled_attention(q, k, v, scale, 0.0, 'sdpa')
    assert y.dtype == torch.bfloat16 and not called
    grads = torch.autograd.grad(y, (q, k, v), dy.bfloat16())
    for ours, theirs, ref in zip((y, *grads), (reference, *reference_grads), (exact, qd.grad, kd.grad, vd.grad)):
        err, reference_err = ((t.double() - ref).abs().max().item() for t in (ours, theirs))
        assert err <= 1.25 * reference_err
    # long sequences (the T2T Transformer layer's thousands of tokens) and float32 keep the fused kernel
    long = torch.randn(1, 1, attention.EXPLICIT_LOW_PRECISION_MAX_KEYS + 1, 64).bfloat16()
    attention.scaled_attention(long, long, long, scale, 0.0, 'sdpa')
    attention.scaled_attention(q.float(), k.float(), v.float(), scale, 0.0, 'sdpa')
    assert len(called) == 2
