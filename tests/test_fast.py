"""Fast inference paths keep the reference numbers: the T2T stem's soft splits as strided convolutions."""
import pytest
import torch
import torch.nn.functional as F

import t2tvit
from conftest import fixture_model


def digits(count: int, size: int) -> torch.Tensor:
    """scikit-learn's handwritten digits as ImageNet-normalised RGB images: flat black backgrounds."""
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    images = torch.from_numpy(load_digits().images[:count]).float()[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[None, :, None, None]
    return (images - mean) / std


def naive_twin(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The same weights on the reference path (unfold, LayerNorm and Linear over patch matrices)."""
    twin = t2tvit.create_model(name, img_size=model.img_size[0], attn_impl='naive').eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


@pytest.mark.parametrize('name', ['t2t_vit_14', 't2t_vit_t_14'])
def test_fused_stem_gives_the_reference_logits_on_real_images(name, fixtures_dir, official_ckpt):
    model = fixture_model(name, fixtures_dir, official_ckpt)
    assert not model.tokens_to_token.fused_split  # opt-in
    model.set_fused_stem(True)
    assert model.tokens_to_token.fused_split
    x = torch.cat([digits(4, 224), torch.randn(2, 3, 224, 224)])
    with torch.no_grad():
        fast_tokens, fast_stages = model.tokens_to_token.forward_stages(x)
        ref_tokens, ref_stages = naive_twin(model, name).tokens_to_token.forward_stages(x)
        torch.testing.assert_close(model(x), naive_twin(model, name)(x), atol=1e-4, rtol=0)
    # the stem's own outputs (before 14 blocks and a LayerNorm) carry float32 rounding of a different sum order
    torch.testing.assert_close(fast_tokens, ref_tokens, atol=5e-4, rtol=0)
    for fast, ref in zip(fast_stages, ref_stages):
        assert fast.shape == ref.shape
        torch.testing.assert_close(fast, ref, atol=5e-4, rtol=0)


def test_training_keeps_the_unfold_stem():
    # the folded projection's weight gradients would lose digits to cancellation: training steps unfold
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_lite_32')
    model.set_fused_stem(True)
    t2t = model.tokens_to_token
    assert t2t._fused_applies() is False  # train mode, grad enabled
    with torch.no_grad():
        assert t2t._fused_applies() is True
    model.eval()
    assert t2t._fused_applies() is True


def test_a_hook_on_a_stem_layer_still_fires():
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_lite_32').eval()
    model.set_fused_stem(True)
    seen = []
    model.tokens_to_token.attention1.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hooked = model(x)
    assert seen == [torch.Size([2, 1024, 27])]
    model.tokens_to_token.attention1.norm1._forward_hooks.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hooked, atol=1e-5, rtol=0)


def test_the_default_stem_keeps_parity_where_the_fused_one_cancels(fixtures_dir, official_ckpt):
    # a letterbox of the mean colour is 0 in every channel after normalisation: flat patches beside a real
    # image, where the fused stem's two float32 sums cancel; the default (unfold) path stays the reference's
    model = fixture_model('t2t_vit_7', fixtures_dir, official_ckpt)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x[..., :64, :] = 0.0
    with torch.no_grad():
        default = model(x)
        reference = naive_twin(model, 't2t_vit_7')(x)
        model.set_fused_stem(True)
        fused = model(x)
        model.set_fused_stem(False)
    torch.testing.assert_close(default, reference, atol=1e-4, rtol=0)
    assert (fused - reference).abs().max() < 1e-2 and fused.argmax() == reference.argmax()
    assert naive_twin(model, 't2t_vit_7').tokens_to_token.fusable is False  # naive never fuses


def test_compiled_fused_stem_gives_the_eager_numbers_and_follows_each_copys_weights():
    import copy
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_lite_32').eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        eager = model(x)
        model.set_fused_stem(True)
        model.set_compiled_stem(True)
        t2t = model.tokens_to_token
        assert t2t.fused_split and t2t.compile_stem
        compiled = model(x)
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
        tokens, stages = t2t.forward_stages(x)
        eager_tokens, eager_stages = t2t.stages(x)
        torch.testing.assert_close(tokens, eager_tokens, atol=1e-5, rtol=0)
        assert [s.shape for s in stages] == [s.shape for s in eager_stages]
        # a copy (an EMA, a deepcopy) with other weights runs its own weights through the compiled stem
        twin = copy.deepcopy(model)
        assert twin.tokens_to_token.compile_stem
        twin.tokens_to_token.project.bias.add_(1.0)
        torch.testing.assert_close(twin.tokens_to_token(x), tokens + 1.0, atol=1e-5, rtol=0)
        twin.tokens_to_token.attention1.kqv.weight.mul_(1.5)  # folded into the first convolution
        moved = twin.tokens_to_token(x)
        twin.set_compiled_stem(False)
        torch.testing.assert_close(moved, twin.tokens_to_token(x), atol=1e-5, rtol=0)
        assert (moved - tokens - 1.0).abs().max() > 1e-3


def test_compiled_stem_trains_with_the_eager_gradients():
    import copy
    torch.manual_seed(0)
    eager = t2tvit.create_model('t2t_vit_lite_32').train()
    for m in eager.modules():  # the Performer's fixed dropout: inductor draws other masks than eager
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    compiled = copy.deepcopy(eager)
    compiled.set_compiled_stem(True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for model in (eager, compiled):
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if n.startswith('tokens_to_token.')})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


# -- compiled training: the soft splits read from tokens, the dropout's hashed masks ----------------
@pytest.mark.parametrize('h,w,k,s,p', [(32, 32, 3, 2, 1), (16, 16, 3, 2, 1), (56, 56, 3, 2, 1), (13, 9, 3, 2, 1),
                                       (15, 15, 7, 4, 2), (8, 8, 3, 1, 1)])
def test_soft_split_from_tokens_is_the_unfold_bit_for_bit(h, w, k, s, p):
    from t2tvit.layers.t2t import _restructurize, split_tokens
    tokens = torch.randn(2, h * w, 5)
    ref = F.unfold(_restructurize(tokens, h, w), k, padding=p, stride=s).transpose(1, 2)
    assert torch.equal(split_tokens(tokens, h, w, k, s, p), ref)


def test_the_compiled_stem_reads_its_splits_from_tokens_and_a_hook_brings_back_the_unfold():
    model = t2tvit.create_model('t2t_vit_lite_32').eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model.tokens_to_token.stages(x)[0]

    def unfolds_in_graph() -> int:
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm.code)
            return gm.forward
        torch._dynamo.reset()
        out = torch.compile(model.tokens_to_token.stages, backend=backend)(x)[0]
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        return sum(code.count('functional.unfold(') for code in graphs)
    assert unfolds_in_graph() == 1  # soft_split0 reads the image; splits 1 and 2 read the tokens
    seen = []
    model.tokens_to_token.soft_split1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert unfolds_in_graph() == 3  # a hooked split runs as nn.Unfold, and its hook fires
    assert seen == [torch.Size([2, 144, 256])]
    torch._dynamo.reset()


def test_dropout_is_torchs_in_eager_mode_and_an_unbiased_bernoulli_when_compiled():
    from t2tvit.layers.dropout import Dropout, hashed_uniform_bits
    ours, ref = Dropout(0.1).train(), torch.nn.Dropout(0.1).train()
    x = torch.randn(64, 1000)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    assert torch.equal(a, ref(x))  # eager: torch's own masks for the same seed (the reference's numbers)
    assert torch.equal(ours.eval()(x), x)
    compiled = torch.compile(Dropout(0.1).train())
    n = 1_000_000
    ones = torch.ones(n)
    torch.manual_seed(0)
    y = compiled(ones)
    torch.manual_seed(0)
    assert torch.equal(compiled(ones), y)  # a function of torch's seed
    assert not torch.equal(compiled(ones), y)  # a new mask per call
    values = y.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.9)
    kept = (y != 0).double()
    # binomial: standard error of the drop rate sqrt(0.09 / n) = 0.0003; 4 of them
    assert abs(1 - kept.mean().item() - 0.1) < 4 * (0.09 / n) ** 0.5
    # neighbours independent (the mask of element i says nothing of i + 1 or of the next row)
    for lag in (1, 16, 1000):
        corr = torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1].item()
        assert abs(corr) < 4 / n ** 0.5, lag
    # the 24-bit uniforms: 64 equal bins within 4.5 standard errors each, and a chi-square of 63 degrees
    # of freedom below its 0.1% point
    bits = hashed_uniform_bits((n,), torch.tensor(12345))
    assert bits.min() >= 0 and bits.max() < 2 ** 24
    counts = torch.bincount(bits >> 18, minlength=64).double()
    expected = n / 64
    assert ((counts - expected).abs() < 4.5 * expected ** 0.5).all()
    assert ((counts - expected) ** 2 / expected).sum() < 103.4
    # the gradient is the mask, scaled
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(1)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.9)


# -- low precision: weights cast once, int8 ---------------------------------------------------------
@pytest.mark.parametrize('dtype,cast,fused', [('bf16', True, False), ('bf16', True, True), ('int8', False, False)])
def test_low_precision_keeps_the_top1_of_float32_on_digits(dtype, cast, fused, fixtures_dir, official_ckpt):
    from t2tvit.analysis.benchmark import top1_agreement
    model = fixture_model('t2t_vit_14', fixtures_dir, official_ckpt)
    # fused: the bf16 model's stem computes in float32 and hands bf16 tokens on (benchmark --fused-stem --cast-weights)
    model.set_fused_stem(fused)
    with torch.inference_mode():
        same, in_top5 = top1_agreement(model, digits(100, 224), dtype=dtype, cast_weights=cast)
    assert same >= 0.99 and in_top5 == 1.0


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_low_precision_keeps_the_reference_top1_on_the_fixtures(name, fixtures_dir, official_ckpt):
    import copy

    from conftest import load_json
    from t2tvit.quantize import quantize_int8
    model = fixture_model(name, fixtures_dir, official_ckpt)
    expected = load_json(fixtures_dir / f'{name}.expected.json')
    x = torch.from_numpy(official_ckpt.make_inputs(expected['input']['batch'], expected['input']['size']))
    reference = [top5[0] for top5 in expected['top5']]
    with torch.inference_mode():
        cast = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16())
        assert cast.dtype == torch.bfloat16 and cast.argmax(-1).tolist() == reference
        assert quantize_int8(model)(x).argmax(-1).tolist() == reference


def test_int8_onnx_export_keeps_the_reference_top1(tmp_path, fixtures_dir, official_ckpt, capsys):
    from conftest import load_json
    from t2tvit.cli import main
    from t2tvit.export import OnnxRuntimeModel, export_model
    from t2tvit.quantize import quantize_onnx_int8
    model = fixture_model('t2t_vit_7', fixtures_dir, official_ckpt)
    expected = load_json(fixtures_dir / 't2t_vit_7.expected.json')
    x = torch.from_numpy(official_ckpt.make_inputs(expected['input']['batch'], expected['input']['size']))
    fp32 = export_model(model, 'onnx', tmp_path / 'fp32.onnx', dynamic_batch=True)
    int8 = quantize_onnx_int8(fp32, tmp_path / 'int8.onnx')
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size  # the blocks' weights are int8
    import onnx
    # the blocks' Linear layers and no more: the stem (Performer features included) stays float32
    blocks_linear = sum(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())
    assert [n.op_type for n in onnx.load(str(int8)).graph.node].count('MatMulInteger') == blocks_linear
    assert OnnxRuntimeModel(int8)(x).argmax(-1).tolist() == [top5[0] for top5 in expected['top5']]
    # the command line writes and checks a quantized file
    out = tmp_path / 'lite.onnx'
    assert main(['export', '--model', 't2t_vit_lite_32', '--quantize', 'int8', '-o', str(out)]) == 0
    assert out.is_file() and 'same top-1 1/1' in capsys.readouterr().out
    assert main(['export', '--model', 't2t_vit_lite_32', '--quantize', 'int8', '--format', 'torchscript']) == 2


@pytest.mark.parametrize('flags', [['--dtype', 'int8'], ['--dtype', 'bf16', '--cast-weights'],
                                   ['--dtype', 'bf16', '--cast-weights', '--fused-stem', '--compile-stem']])
def test_benchmark_runs_low_precision(flags, capsys):
    import json

    from t2tvit.cli import main
    assert main(['benchmark', '--model', 't2t_vit_lite_32', '-b', '2', '--steps', '1', '--warmup', '1',
                 '--no-memory', '--json', *flags]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row['dtype'] == flags[1] and row['img_per_s'] > 0 and row['cast_weights'] == ('--cast-weights' in flags)
    assert row['compile_stem'] == row['fused_stem'] == ('--compile-stem' in flags)


@pytest.mark.parametrize('flags', [['--dtype', 'int8', '--mode', 'train'], ['--cast-weights'],
                                   ['--dtype', 'bf16', '--cast-weights', '--mode', 'train'],
                                   ['--fused-stem', '--mode', 'train'], ['--compile-stem', '--compile']])
def test_benchmark_low_precision_mistakes_are_user_errors(flags, capsys):
    from t2tvit.cli import main
    assert main(['benchmark', '--model', 't2t_vit_lite_32', '--no-memory', *flags]) == 2
    assert 'error:' in capsys.readouterr().err


# -- where the time goes, and beside other models -----------------------------------------------------
def test_benchmark_breakdown_prints_each_stage_share(capsys):
    from t2tvit.cli import main
    assert main(['benchmark', '--model', 't2t_vit_lite_32', '-b', '2', '--steps', '2', '--breakdown']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('t2t_vit_lite_32 forward, batch 2')
    shares = [float(line.split()[-1].rstrip('%')) for line in lines[1:]]
    assert len(shares) == 3 and all(s >= 0 for s in shares) and abs(sum(shares) - 100) < 0.5
    assert 'T2T stem' in lines[1] and 'blocks' in lines[2] and 'head' in lines[3]


def test_benchmark_compare_times_timm_models_beside_ours(capsys):
    from t2tvit.cli import main
    assert main(['benchmark', '--model', 't2t_vit_lite_32', '-b', '2', '--steps', '2',
                 '--compare', 'resnet18']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {'t2t_vit_lite_32', 'resnet18'}
    assert rows['t2t_vit_lite_32'][3] == '1.00x' and float(rows['resnet18'][1]) > 0
    assert rows['resnet18'][-1] == '-'  # no published top-1 on record for it
    assert main(['benchmark', '--model', 't2t_vit_lite_32', '--compare', 'no_such_model']) == 2



# -- OpenVINO ----------------------------------------------------------------------------------------
def _openvino_matches(model: torch.nn.Module, tmp_path, dynamic_batch: bool = True) -> float:
    from t2tvit.export import OpenVinoModel, export_model
    path = export_model(model, 'openvino', tmp_path / 'model.xml', dynamic_batch=dynamic_batch)
    assert path.is_file() and path.with_suffix('.bin').is_file()
    x = torch.randn(3 if dynamic_batch else 1, 3, *model.img_size)
    with torch.no_grad():
        return (OpenVinoModel(path)(x) - model(x)).abs().max().item()


def test_openvino_export_matches_pytorch(tmp_path, fixtures_dir, official_ckpt, capsys):
    pytest.importorskip('openvino', reason='openvino is not installed (pip install "t2tvit[openvino]")')
    from t2tvit.cli import main
    assert _openvino_matches(fixture_model('t2t_vit_7', fixtures_dir, official_ckpt), tmp_path) <= 1e-4
    out = tmp_path / 'lite.xml'
    assert main(['export', '--model', 't2t_vit_lite_32', '--format', 'openvino', '-o', str(out)]) == 0
    assert out.is_file() and '(within 0.0001)' in capsys.readouterr().out
    assert main(['export', '--model', 't2t_vit_lite_32', '--format', 'openvino', '-o', str(tmp_path / 'a.onnx')]) == 2


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(t2tvit.models.PAPER_RESULTS))
def test_openvino_export_matches_pytorch_every_paper_model(name, tmp_path, fixtures_dir, official_ckpt):
    pytest.importorskip('openvino', reason='openvino is not installed (pip install "t2tvit[openvino]")')
    assert _openvino_matches(fixture_model(name, fixtures_dir, official_ckpt), tmp_path) <= 1e-4
