"""The T2T stages' attention: the Performer's implicit matrix is what the layer attends with (A @ v is its
output), the Transformer T2T layer's softmax weights are its own, and `visualize attention --stages` draws
one query's row on each stage's grid."""
import numpy as np
import pytest
import torch
from PIL import Image

import t2tvit
from t2tvit.analysis import t2t_attention as ta
from t2tvit.cli import main
from t2tvit.layers.performer import performer_attention


def _recorded(name: str, size: int = 32, **kw):
    torch.manual_seed(0)
    model = t2tvit.create_model(name, img_size=size, **kw).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), ta.stage_inputs(model) as inputs:
        model.forward_features(x)
    return model, inputs


@pytest.mark.parametrize('stage', ['t2t1', 't2t2'])
def test_performer_implicit_matrix_times_v_is_the_layers_attention_output(stage):
    model, inputs = _recorded('t2t_vit_7_32')
    layer = getattr(model.tokens_to_token, 'attention1' if stage == 't2t1' else 'attention2')
    x = inputs[stage]
    with torch.no_grad():
        a = ta.performer_attention_weights(layer, x)                 # (B, T, T), every query
        q, k, v = ta.performer_qkv(layer, x)
        assert a.shape == (2, x.shape[1], x.shape[1]) and a.dtype == torch.float32
        torch.testing.assert_close(a @ v, performer_attention(q, k, v, layer.w, layer.epsilon), rtol=1e-5, atol=1e-6)
        # through the layer's own method, projection and skip included
        kqv = layer.kqv(layer.norm1(x))
        torch.testing.assert_close(v + layer.proj(a @ v), layer.attend(kqv), rtol=1e-5, atol=1e-5)
        # normalised per query, non-negative (positive random features)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), rtol=0, atol=1e-5)
        # one query's row is the same row of the full matrix
        rows = ta.performer_attention_weights(layer, x, torch.tensor([5, 17]))
        torch.testing.assert_close(rows, a[:, [5, 17]])


def test_performer_weights_are_float32_from_the_saved_w_under_bf16_autocast():
    model, inputs = _recorded('t2t_vit_7_32')
    layer, x = model.tokens_to_token.attention1, inputs['t2t1']
    with torch.no_grad():
        plain = ta.performer_attention_weights(layer, x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            under = ta.performer_attention_weights(layer, x)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0.05, atol=1e-4)  # only kqv runs in bf16
    layer.w.mul_(2.0)  # the weights come from the saved w: changing it changes them
    with torch.no_grad():
        assert not torch.allclose(ta.performer_attention_weights(layer, x), plain)


def test_transformer_t2t_weights_times_v_are_the_layers_attention():
    model, inputs = _recorded('t2t_vit_t_14', size=64)
    layer = model.tokens_to_token.attention2
    x = inputs['t2t2']
    with torch.no_grad():
        a = ta.transformer_attention_weights(layer, x)                # (B, heads, T, T)
        qkv = layer.attn.qkv(layer.norm1(x))
        _, _, v = layer.attn.qkv_heads(layer.norm1(x))
        y = (a @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        expected = layer.attn.attend(qkv)
        torch.testing.assert_close(v.transpose(1, 2).reshape_as(y) + layer.attn.proj(y), expected, rtol=1e-4,
                                   atol=1e-5)


def test_stage_attention_is_the_query_row_on_each_stage_grid():
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_7_32').eval()
    x = torch.randn(1, 3, 32, 32)
    maps = ta.stage_attention(model, x, ['t2t1', 't2t2'], (20.0, 6.0))
    assert maps['t2t1'].shape == (32, 32) and maps['t2t2'].shape == (16, 16)
    with torch.no_grad(), ta.stage_inputs(model) as inputs:
        model.forward_features(x)
    full = ta.performer_attention_weights(model.tokens_to_token.attention2, inputs['t2t2'])
    torch.testing.assert_close(maps['t2t2'].flatten(), full[0, 3 * 16 + 10])  # pixel (20, 6) -> token (3, 10)
    other = ta.stage_attention(model, x, ['t2t2'], (2.0, 30.0))
    assert not torch.allclose(other['t2t2'], maps['t2t2'])


def test_cli_draws_the_t2t_stages(tmp_path, capsys):
    path = tmp_path / 'scene.png'
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(40, 40, 3) * 255).astype('uint8')).save(path)
    assert main(['visualize', 'attention', str(path), '--model', 't2t_vit_7_32', '--stages', 't2t1', 't2t2',
                 '--query', '8', '8', '-o', str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(tmp_path / 'attention_t2t.png')
    assert Image.open(printed[-1]).size == (1200, 440)  # two stages: overlay and grid each


@pytest.mark.parametrize('model, args, message', [
    ('t2t_vit_c_14', [], 'convolutions (T2T-ViT-c): no T2T attention'),
    ('vit_s_16', [], 'no T2T module'),
    ('t2t_vit_7_32', ['--query', '40', '3'], '--query 40 3 is outside the 32x32 input'),
])
def test_t2t_attention_mistakes_are_one_line(model, args, message, tmp_path, capsys):
    path = tmp_path / 'x.png'
    Image.new('RGB', (32, 32), (90, 20, 200)).save(path)
    size = [] if model.endswith('_32') else ['--img-size', '64']
    rc = main(['visualize', 'attention', str(path), '--model', model, '--stages', 't2t1', *size, *args,
               '-o', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count('\n') == 1, err
