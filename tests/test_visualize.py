"""`t2tvit visualize`: feature pictures with the red-outline rule, attention per head and rollout."""
import numpy as np
import pytest
import torch
from PIL import Image

import t2tvit
from t2tvit.analysis import visualize as viz
from t2tvit.cli import main
from t2tvit.errors import UserError

SMALL = 't2t_vit_7_32'


def _model(**kw):
    torch.manual_seed(0)
    return t2tvit.create_model(SMALL, dynamic_img_size=True, **kw).eval()


@pytest.fixture(scope='module')
def image_path(tmp_path_factory):
    rng = np.random.RandomState(0)
    a = (rng.rand(48, 64, 3) * 255).astype('uint8')
    a[10:30, 12:50] = (30, 160, 220)
    path = tmp_path_factory.mktemp('img') / 'scene.png'
    Image.fromarray(a).save(path)
    return path


def _red(png) -> np.ndarray:
    a = np.asarray(Image.open(png).convert('RGB')).astype(int)
    return (a[..., 0] > 200) & (a[..., 1] < 80) & (a[..., 2] < 80)


def _around(mask: np.ndarray, box, margin: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = margin * (x1 - x0)
    return mask[int(y0 - m):int(y1 + m) + 1, int(x0 - m):int(x1 + m) + 1]


# -- the red-outline rule -------------------------------------------------------------------------
def test_rule_marks_all_zero_and_extreme_channels_only():
    maps = torch.randn(12, 6, 6, generator=torch.Generator().manual_seed(0))
    maps[2] = 0.0
    maps[5] *= 100.0              # peak far above 10x the layer's median peak
    maps[7] *= 3.0                # large but ordinary
    maps[9] = 1e-9                # zero at the layer's scale
    assert viz.invalid_channels(maps).nonzero().flatten().tolist() == [2, 5, 9]


def test_rule_threshold_is_relative_to_the_layer_median_peak():
    maps = torch.ones(5, 4, 4)
    maps[0] *= 9.9
    maps[1] *= 10.1
    assert viz.invalid_channels(maps).tolist() == [False, True, False, False, False]
    # a ReLU layer with mostly dead channels: the live ones are measured among themselves
    relu = torch.zeros(5, 4, 4)
    relu[0, 0, 0] = 1.0
    relu[1, 0, 0] = 2.0
    assert viz.invalid_channels(relu).tolist() == [False, False, True, True, True]
    assert viz.invalid_channels(torch.zeros(3, 2, 2)).all()


def _plant_zero_stage1_channel(model, c: int):
    """Zero every path into channel ``c`` of the first T2T stage (Performer v, proj, MLP out)."""
    perf = model.tokens_to_token.attention1
    emb = perf.emb
    with torch.no_grad():
        perf.kqv.weight[2 * emb + c] = 0
        perf.kqv.bias[2 * emb + c] = 0
        perf.proj.weight[c] = 0
        perf.proj.bias[c] = 0
        perf.mlp[2].weight[c] = 0
        perf.mlp[2].bias[c] = 0


def test_planted_zero_channel_is_outlined_in_red_in_the_png(image_path, tmp_path):
    model = _model()
    _plant_zero_stage1_channel(model, 3)
    pic = viz.visualize_features(str(image_path), SMALL, layers=['t2t1', 't2t2', '7'], out_dir=tmp_path,
                                 model=model)
    assert pic.path == tmp_path / 'features.png'
    assert pic.invalid == {'T2T stage 1': [3], 'T2T stage 2': [], 'block 7': []}
    with Image.open(pic.path) as im:
        assert im.size == pic.size == (3 * 320, 460)
    red = _red(pic.path)
    planted = _around(red, pic.boxes[('T2T stage 1', 3)], 0.25)
    assert planted.sum() > 50, 'no red outline around the planted all-zero channel'
    # a valid channel far from it, and the same channel of the next stage, stay unmarked
    assert _around(red, pic.boxes[('T2T stage 1', 15)], 0.25).sum() == 0
    assert _around(red, pic.boxes[('T2T stage 2', 3)], 0.25).sum() == 0
    assert red.sum() == planted.sum()


# -- features through the CLI ---------------------------------------------------------------------
def test_features_cli_with_resnet50_and_a_larger_render(image_path, tmp_path, capsys):
    rc = main(['visualize', 'features', str(image_path), '--model', SMALL, '--compare', 'resnet50',
               '--img-size', '64', '--channels', '4', '-o', str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / 'features.png')]
    with Image.open(out[0]) as im:  # resnet50 conv1 + t2t1 + t2t2 + first and last block
        assert im.size == (5 * 320, 460)


def test_layers_at_a_larger_image_keep_the_stride(image_path):
    model = _model()
    x, _ = viz.image_tensor(viz.load_image(image_path), model, img_size=64)
    assert x.shape == (1, 3, 64, 64)
    layers = viz.feature_layers(model, x, ['t2t1', 't2t2', 'block2'])
    assert [tuple(m.maps.shape) for m in layers] == [(64, 64, 64), (64, 32, 32), (256, 16, 16)]
    assert [m.name for m in layers] == ['T2T stage 1', 'T2T stage 2', 'block 2']


def test_resnet50_is_built_without_downloading(monkeypatch):
    import timm
    calls = []
    real = timm.create_model

    def spy(name, pretrained=False, **kw):
        calls.append(pretrained)
        return real(name, pretrained=pretrained, **kw)
    monkeypatch.setattr(timm, 'create_model', spy)
    maps = viz.resnet50_conv1(torch.zeros(1, 3, 32, 32))
    assert calls == [False] and maps.maps.shape == (64, 16, 16)


# -- attention ------------------------------------------------------------------------------------
def test_recomputed_weights_are_the_ones_the_sdpa_forward_uses():
    model = _model()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with viz.recorded_attention_inputs(model) as inputs:
        model(x)
    attn = model.blocks[4].attn
    inp = inputs[4]
    with torch.no_grad():
        w = attn.attention_weights(inp)
        _, _, v = attn.qkv_heads(inp)
        y = attn.proj((w @ v).transpose(1, 2).reshape(inp.shape))
        torch.testing.assert_close(y, attn(inp), atol=1e-5, rtol=1e-4)
    assert torch.allclose(w.sum(-1), torch.ones(()))


def test_hooks_are_removed_and_the_forward_is_unchanged():
    model = _model()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    heads, rollout, grid = viz.block_attention(model, x, [4, 5])
    assert all(not blk.attn._forward_pre_hooks and not blk.attn._forward_hooks for blk in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert grid == (8, 8) and list(heads) == [4, 5]
    assert heads[4].shape == (4, 8, 8) and rollout.shape == (8, 8)


def test_rollout_is_the_product_of_head_averaged_residual_attention():
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(2, 3, 5, 5, generator=g).softmax(-1) for _ in range(4)]
    eye = torch.eye(5)
    layers = [(w.mean(1) + eye) / (w.mean(1) + eye).sum(-1, keepdim=True) for w in weights]
    full = layers[3] @ layers[2] @ layers[1] @ layers[0]
    rows = viz.attention_rollout(weights)
    torch.testing.assert_close(rows, full[:, 0])
    torch.testing.assert_close(rows.sum(-1), torch.ones(2))


def test_block_attention_rollout_matches_the_rollout_of_all_blocks():
    model = _model()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with viz.recorded_attention_inputs(model) as inputs, torch.no_grad():
        model(x)
        weights = [model.blocks[i].attn.attention_weights(inputs[i]) for i in range(len(model.blocks))]
    heads, rollout, _ = viz.block_attention(model, x, [7])
    torch.testing.assert_close(rollout.flatten(), viz.attention_rollout(weights)[0, 1:])
    torch.testing.assert_close(heads[7].flatten(1), weights[6][0, :, 0, 1:])


def test_attention_cli_writes_heads_and_rollout(image_path, tmp_path, capsys):
    rc = main(['visualize', 'attention', str(image_path), '--model', SMALL, '--blocks', '4', '5',
               '-o', str(tmp_path)])
    assert rc == 0
    paths = capsys.readouterr().out.split()
    assert paths == [str(tmp_path / 'attention_heads.png'), str(tmp_path / 'attention_rollout.png')]
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(800, 610), (900, 440)]  # 2 blocks x 4 heads; input | overlay | rollout


# -- user mistakes --------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'CMYK', 'RGBA', 'I;16'])
def test_any_pil_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ('x.jpg' if mode == 'CMYK' else 'x.png')
    if mode == 'I;16':
        Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).save(path)
    else:
        Image.new('RGB', (20, 10), (200, 30, 30)).convert(mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    img = viz.load_image(path)
    assert img.mode == 'RGB' and img.size == (20, 10)


def test_transparent_pixels_are_shown_on_white(tmp_path):
    path = tmp_path / 'a.png'
    Image.new('RGBA', (4, 4), (0, 0, 0, 0)).save(path)
    assert viz.load_image(path).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize('args, message', [
    (['features', 'missing.jpg'], 'missing.jpg: no such image file'),
    (['features', 'CORRUPT', '--layers', 'block99'], 'cannot be read as an image'),
    (['attention', 'IMAGE', '--blocks', '9'], '--blocks 9 is out of range: this model has blocks 1..7'),
    (['features', 'IMAGE', '--layers', 'block99'], "unknown layer 'block99'"),
    (['features', 'IMAGE', '--img-size', '30'], 'not a multiple of the model\'s token stride 4'),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message, image_path, tmp_path, capsys):
    corrupt = tmp_path / 'corrupt.jpg'
    corrupt.write_bytes(b'\xff\xd8\xff not really a jpeg')
    args = [{'IMAGE': str(image_path), 'CORRUPT': str(corrupt)}.get(a, a) for a in args]
    rc = main(['visualize'] + args + ['--model', SMALL, '-o', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count('\n') == 1


def test_load_image_raises_user_error_on_truncated_file(image_path, tmp_path):
    path = tmp_path / 'cut.png'
    path.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(UserError, match='cannot be read as an image'):
        viz.load_image(path)


def test_a_transition_block_has_no_attention_and_rollout_skips_it():
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_dense', img_size=32, t2t_kernel_sizes=(3, 3, 3), t2t_strides=(1, 2, 2),
                                t2t_paddings=(1, 1, 1), block_config=(1, 1), growth_rate=16, embed_dim=32,
                                num_heads=2).eval()
    assert [type(b).__name__ for b in model.blocks] == ['DenseBlock', 'Transition', 'DenseBlock']
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UserError, match='block 2 has no attention'):
        viz.block_attention(model, x, [2])
    heads, rollout, _ = viz.block_attention(model, x, [1, 3])
    assert list(heads) == [1, 3] and rollout.shape == (8, 8)


# -- report ---------------------------------------------------------------------------------------
def _row(name, macs_g, params_m, top1, img_size=224):
    return {'model': name, 't2t': 'performer', 'depth': 7, 'width': 256, 'img_size': img_size,
            'params': params_m * 1e6, 'macs': macs_g * 1e9, 'paper_top1': top1, 'paper_params_m': params_m,
            'paper_macs_g': macs_g}


def test_report_plot_draws_the_paper_models_only(tmp_path):
    rows = [_row('t2t_vit_7', 1.1, 4.3, 71.7), _row('t2t_vit_14', 4.8, 21.5, 81.5),
            _row('t2t_vit_t_14', 6.1, 21.5, 81.7), _row('vit_s_16', 10.1, 48.6, 78.1),
            _row('t2t_vit_c_14', 4.6, 21.3, 80.8), _row('t2t_vit_14_resnext', 4.8, 21.5, 81.5),
            _row('t2t_vit_7_32', 0.3, 4.3, None, img_size=32), _row('my_model', 1.0, 1.0, None)]
    pic = viz.render_report(rows, tmp_path / 'r.png')
    assert pic.models == ['t2t_vit_7', 't2t_vit_14', 't2t_vit_t_14', 'vit_s_16', 't2t_vit_c_14',
                          't2t_vit_14_resnext']
    with Image.open(pic.path) as im:
        assert im.size == pic.size == (1300, 560)
    assert [viz.paper_label(n) for n in ('t2t_vit_t_14', 'vit_s_16', 't2t_vit_14_wo_t2t')] == \
        ['T2T-ViT-t-14', 'ViT-S/16', 'T2T-ViT-14-wo-t2t']


def test_report_cli_writes_the_table_and_the_plot(tmp_path, capsys, monkeypatch):
    from t2tvit.analysis import report
    real = report.model_rows
    monkeypatch.setattr(report, 'model_rows', lambda: real('t2t_vit_1[02]') + real('t2t_vit_7*'))
    assert main(['report', '-o', str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [str(tmp_path / 'report.md'), str(tmp_path / 'report.png')]
    md = (tmp_path / 'report.md').read_text()
    assert '| `t2t_vit_12` | performer | 12 | 256 | 6.94 | 1.76 | 76.5 | 6.9 | 1.8 |' in md
    assert '`t2t_vit_7_32` (32px)' in md and '(report.png)' in md
    with Image.open(tmp_path / 'report.png') as im:
        assert im.size == (1300, 560)
    assert main(['report', '--markdown', '-o', str(tmp_path / 'md')]) == 0
    assert sorted(p.name for p in (tmp_path / 'md').iterdir()) == ['report.md']


# -- checkpoints ----------------------------------------------------------------------------------
def test_the_checkpoints_weights_are_pictured(image_path, tmp_path, capsys):
    model = _model(num_classes=10)
    _plant_zero_stage1_channel(model, 5)
    path = tmp_path / 'digits.pth'
    torch.save(model.state_dict(), path)
    pic = viz.visualize_features(str(image_path), SMALL, checkpoint=str(path), layers=['t2t1'], out_dir=tmp_path)
    assert pic.invalid == {'T2T stage 1': [5]}  # random weights would outline nothing
    rc = main(['visualize', 'attention', str(image_path), '--model', 't2t_vit_7', '--checkpoint', str(path),
               '-o', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1
