"""The ablations and ViT baselines of Tables 2, 6 and 7: reference layouts, the timm contract, both attentions."""
from functools import partial

import pytest
import timm
import torch
from torch import nn

import t2tvit
from conftest import load_json
from t2tvit.models import PAPER_RESULTS, Block, ablations

ABLATIONS = list(ablations.MODEL_CONFIGS)
SPEC_MODELS = ['t2t_vit_14_se', 't2t_vit_16_ghost', 't2t_vit_dense']
SIZE = 32  # every ablation tiles 32x32 (a 2x2 token grid): fast on CPU, same code paths as 224


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SIZE, **kw).eval()


def _x(size=SIZE, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_every_ablation_is_registered_with_its_paper_numbers():
    assert set(ABLATIONS) <= set(t2tvit.list_models())
    assert set(ABLATIONS) == set(timm.list_models(module='ablations'))
    assert all(name in PAPER_RESULTS for name in ABLATIONS)


@pytest.mark.parametrize('name', SPEC_MODELS)
def test_state_dict_has_the_reference_keys_and_shapes(name, fixtures_dir):
    spec = load_json(fixtures_dir / f'{name}.spec.json')
    with torch.device('meta'):
        model = timm.create_model(name, img_size=spec['img_size'], **spec['kwargs'])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, shape in spec['keys']}


@pytest.mark.parametrize('name', ABLATIONS)
def test_sdpa_and_naive_attention_agree(name):
    model = _model(name)
    with torch.device('meta'):
        naive = timm.create_model(name, img_size=SIZE, attn_impl='naive')
    naive.load_state_dict(model.state_dict(), assign=True)
    naive.eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(naive(x), model(x), atol=1e-5, rtol=1e-5)


def test_dense_widths_head_and_drop_path_follow_the_reference():
    model = _model('t2t_vit_dense', drop_path_rate=0.11)
    assert model.num_features == 584 and model.embed_dim == 128
    transitions = [i for i, blk in enumerate(model.blocks) if isinstance(blk, ablations.Transition)]
    assert transitions == [3, 10, 17]
    # reference quirk: rate = linspace(0, 0.11, 12)[stage], so 0.01 per stage
    rates = [getattr(blk.drop_path, 'drop_prob', 0.0) for blk in model.blocks
             if isinstance(blk, ablations.DenseBlock)]
    assert rates == pytest.approx([0.0] * 3 + [0.01] * 6 + [0.02] * 6 + [0.03] * 4)
    model.reset_classifier(10)  # the reference would build it on 128 features
    assert model.head.in_features == 584
    assert model.forward_intermediates(_x(), indices=[-1], intermediates_only=True)[0].shape == (2, 584, 2, 2)
    with pytest.raises(ValueError, match='narrower'):
        model.forward_intermediates(_x(), norm=True)


def test_dense_block_appends_the_features_of_a_backbone_block():
    # DenseBlock writes Block.forward out (TorchScript has no super()): the two must stay the same
    torch.manual_seed(0)
    blk = ablations.DenseBlock(32, 8, num_heads=4, drop_path=0.0).eval()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(blk(x), torch.cat((x, blk.dense_linear(Block.forward(blk, x))), dim=2))


def test_se_layer_gates_channels_with_the_token_mean():
    se = ablations.SELayer(32)
    x = torch.randn(2, 5, 32)
    gate = se.fc(x.mean(dim=1))
    torch.testing.assert_close(se(x), x * gate[:, None])
    assert ((gate > 0) & (gate < 1)).all()


def test_ghost_mlp_needs_a_whole_hidden_ratio():
    assert len([n for n, _ in ablations.GhostMlp(8, 32).named_children() if n.startswith('cheap')]) == 3
    with pytest.raises(ValueError, match='multiple of the width'):
        ablations.GhostMlp(8, 20)


def test_wo_t2t_keeps_the_fixed_sinusoid_table_and_vit_learns_its_own():
    wo_t2t, vit = _model('t2t_vit_14_wo_t2t'), _model('vit_dn')
    assert 'pos_embed' in dict(wo_t2t.named_buffers()) and 'pos_embed' not in dict(wo_t2t.named_parameters())
    assert 'pos_embed' in dict(vit.named_parameters()) and all(p.requires_grad for p in vit.parameters())


def test_vit_s_16_loads_timm_vision_transformer_weights():
    # the same layout as timm's ViT (and its old vit_small_patch16_224): weights load strictly, outputs agree
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=SIZE, patch_size=16, embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0, qkv_bias=False,
        norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()
    ours = _model('vit_s_16', qk_scale=96 ** -0.5)  # timm's ViT now always scales by head_dim ** -0.5
    ours.load_state_dict(vit.state_dict(), strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), vit(x), atol=1e-5, rtol=1e-5)
    assert _model('vit_s_16').blocks[0].attn.scale == pytest.approx(768 ** -0.5)
