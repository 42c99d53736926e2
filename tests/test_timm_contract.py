"""The timm model contract, as a timm user relies on it: in detail on the paper's models, and the checks of
timm's own model tests on every registered model (the ablations and ViT baselines too)."""
import copy

import pytest
import timm
import torch

import t2tvit

SMALL = 't2t_vit_7_32'  # 32x32 geometry: fast on CPU, same code paths as the 224 models


def _model(name=SMALL, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


def _x(size=32, batch=2, chans=3):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


def test_every_paper_model_is_registered_in_timm():
    paper = ['t2t_vit_7', 't2t_vit_10', 't2t_vit_12', 't2t_vit_14', 't2t_vit_19', 't2t_vit_24',
             't2t_vit_t_14', 't2t_vit_t_19', 't2t_vit_t_24', 't2t_vit_14_resnext', 't2t_vit_14_wide']
    assert set(paper) <= set(timm.list_models('t2t_vit*'))
    assert set(paper) <= set(t2tvit.list_models())


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_pretrained_cfg_matches_the_reference_evaluation(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224)
    assert cfg['crop_pct'] == 0.9 and cfg['interpolation'] == 'bicubic'
    assert tuple(cfg['mean']) == (0.485, 0.456, 0.406) and tuple(cfg['std']) == (0.229, 0.224, 0.225)
    assert cfg['classifier'] == 'head' and cfg['num_classes'] == 1000
    first = dict(model.named_modules())[cfg['first_conv']]
    assert first.weight.shape[1] == 3 * 7 * 7  # consumes the first soft split of the RGB image
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['crop_pct'] == 0.9


def test_forward_features_head_and_classifier():
    model = _model()
    x = _x()
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 8 * 8, 256)
    assert model.num_features == model.head_hidden_size == 256
    pre = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pre, tokens[:, 0])
    torch.testing.assert_close(model(x), model.get_classifier()(pre))
    assert model(x).shape == (2, 1000) and model.num_classes == 1000
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    assert {'cls_token'} <= model.no_weight_decay()


def test_num_classes_in_chans_and_drop_path_kwargs():
    model = _model(num_classes=3, in_chans=1, drop_path_rate=0.1)
    assert model(_x(chans=1)).shape == (2, 3)
    rates = [blk.drop_path.drop_prob for blk in model.blocks if hasattr(blk.drop_path, 'drop_prob')]
    assert rates and max(rates) == pytest.approx(0.1)


def test_backward_reaches_every_parameter_and_the_fixed_tables_are_buffers():
    model = _model(num_classes=5).train()
    model(_x()).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # the reference's frozen sinusoid table and Performer features: buffers under the reference's keys
    fixed = ['pos_embed', 'tokens_to_token.attention1.w', 'tokens_to_token.attention2.w']
    assert set(fixed) <= dict(model.named_buffers()).keys()
    assert set(fixed) <= model.state_dict().keys()
    assert not set(fixed) & dict(model.named_parameters()).keys()


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14', 't2t_vit_14_wo_t2t'])
def test_grad_checkpointing_gives_the_same_outputs_and_grads(name):
    x = _x()
    outs = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = t2tvit.create_model(name, img_size=x.shape[-1], drop_path_rate=0.1).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(3)  # dropout (the Performer keeps the reference's 0.1) and drop-path are replayed
        y = model(x)
        y.square().mean().backward()
        outs.append([y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_grad_checkpointing_switches_the_t2t_layers_too():
    model = _model()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and model.tokens_to_token.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing and not model.tokens_to_token.grad_checkpointing


def test_forward_intermediates_give_strides_4_8_16():
    model = _model('t2t_vit_7')
    x = _x(224, batch=1)
    final, feats = model.forward_intermediates(x)
    assert [f.shape[-1] for f in feats] == [56, 28] + [14] * 7
    assert feats[0].shape == (1, 64, 56, 56) and feats[-1].shape == (1, 256, 14, 14)
    torch.testing.assert_close(model.forward_head(final), model(x))
    only = model.forward_intermediates(x, indices=[0, 1, 8], intermediates_only=True)
    assert [f.shape[-1] for f in only] == [56, 28, 14]
    nlc = model.forward_intermediates(x, indices=1, output_fmt='NLC', intermediates_only=True)
    assert nlc[0].shape == (1, 196, 256)


def test_features_only_returns_nchw_maps_at_strides_4_8_16():
    model = timm.create_model(SMALL, features_only=True).eval()
    assert model.feature_info.reduction() == [1, 2, 4]  # the 32x32 geometry: strides (1, 2, 2)
    feats = model(_x())
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 256, 8, 8)]
    model = timm.create_model('t2t_vit_t_14', features_only=True, out_indices=(0, 1, 5))
    assert model.feature_info.reduction() == [4, 8, 16]
    assert model.feature_info.channels() == [64, 64, 384]
    assert len(model.model.blocks) == 4  # pruned after the last block asked for


@pytest.mark.parametrize('name', ['t2t_vit_7_32'])
@pytest.mark.parametrize('attn_impl', ['sdpa', 'naive'])
def test_torchscript_and_fx_trace_give_the_same_outputs(name, attn_impl):
    model = _model(name, attn_impl=attn_impl)
    x = _x()
    ref = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), ref, atol=1e-5, rtol=1e-5)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), ref, atol=1e-5, rtol=1e-5)


def test_other_image_sizes_and_untileable_size():
    model = _model('t2t_vit_7', img_size=(160, 96))
    assert model.grid_size == (10, 6)
    assert model(torch.randn(1, 3, 160, 96)).shape == (1, 1000)
    with pytest.raises(ValueError, match='multiple of 16'):
        timm.create_model('t2t_vit_7', img_size=200)


def test_dynamic_img_size_resizes_the_position_table():
    model = _model('t2t_vit_7_32', dynamic_img_size=True)
    assert model(_x(48)).shape == (2, 1000)


# -- every registered model ------------------------------------------------------------------------
# Each model is built once (a module-scoped fixture) at a size every model tiles: a 2x3 token grid at
# stride 16, not square, so a swapped height and width cannot pass. The deeper copies of t2t_vit_14 and
# t2t_vit_t_14 share their code paths and run with `-m slow`.
SIZE = (32, 48)
SAME_LAYERS_AS_A_SMALLER_MODEL = {'t2t_vit_19', 't2t_vit_24', 't2t_vit_t_19', 't2t_vit_t_24'}
EVERY_MODEL = [pytest.param(name, marks=pytest.mark.slow) if name in SAME_LAYERS_AS_A_SMALLER_MODEL else name
               for name in t2tvit.list_models()]


@pytest.fixture(scope='module', params=EVERY_MODEL)
def registered(request):
    """(name, eval-mode model with a 5-class head at SIZE, input batch of 2)."""
    torch.manual_seed(0)
    model = timm.create_model(request.param, img_size=SIZE, num_classes=5).eval()
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    return request.param, model, x


def test_every_model_scripts_and_fx_traces_to_its_eager_outputs(registered):
    _, model, x = registered
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), ref, atol=1e-5, rtol=1e-5)


def test_every_model_trains_every_parameter(registered):
    # timm's test_model_backward: a gradient for every parameter, as many gradient values as parameters
    _, model, x = registered
    model = copy.deepcopy(model).train()
    y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())


def _timm_fx_extractor(model, train: bool):
    """The model traced the way timm's fx tests trace it: torchvision's feature extractor, timm's leaf
    modules and wrapped functions, returning the graph's output node."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kwargs = {'leaf_modules': list(get_notrace_modules()), 'autowrap_functions': list(get_notrace_functions())}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs).train(train)


def test_every_model_traces_with_timms_fx_extractor_forward_and_backward(registered):
    _, model, x = registered
    model = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
        out = list(_timm_fx_extractor(model, train=False)(x).values())[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # timm's test_model_backward_fx: the traced training graph reaches every parameter
    fx_model = _timm_fx_extractor(model.train(), train=True)
    y = list(fx_model(x).values())[0]
    assert y.shape == (2, 5)
    y.mean().backward()
    assert [n for n, p in fx_model.named_parameters() if p.grad is None] == []
    assert sum(p.numel() for p in fx_model.parameters()) == sum(p.numel() for p in model.parameters())


def test_every_model_keeps_timms_head_contract(registered):
    _, model, x = registered
    model = copy.deepcopy(model)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + model.grid_size[0] * model.grid_size[1], model.num_features)
        pre = model.forward_head(tokens, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(pre, tokens[:, 0])
        torch.testing.assert_close(model(x), model.get_classifier()(pre))
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), tokens)
    # the class token is never decayed; the position table only where it is learned (a parameter)
    assert model.no_weight_decay() == ({'cls_token', 'pos_embed'} if isinstance(model.pos_embed, torch.nn.Parameter)
                                       else {'cls_token'})


@pytest.mark.parametrize('name', t2tvit.list_models())
def test_every_pretrained_cfg_names_layers_of_its_model(name):
    with torch.device('meta'):
        model = timm.create_model(name)
        gray = timm.create_model(name, in_chans=1)
    cfg, weights = model.pretrained_cfg, model.state_dict()
    assert cfg['classifier'] + '.weight' in weights
    # first_conv is the layer that reads the image: the one whose input width follows in_chans
    first = cfg['first_conv'] + '.weight'
    assert weights[first].shape[1] == 3 * gray.state_dict()[first].shape[1]
    assert cfg['num_classes'] == model.num_classes and cfg['input_size'] == (3, *model.img_size)
    assert {'mean', 'std', 'crop_pct', 'interpolation'} <= cfg.keys()


def test_every_model_gives_the_feature_maps_its_feature_info_lists(registered):
    name, model, x = registered
    info = model.feature_info
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(f.shape) for f in feats] == [
            (2, i['num_chs'], SIZE[0] // i['reduction'], SIZE[1] // i['reduction']) for i in info]
        features = timm.create_model(name, img_size=SIZE, features_only=True).eval()
        maps = features(x)
    assert [tuple(f.shape) for f in maps] == [(2, c, SIZE[0] // r, SIZE[1] // r) for c, r in zip(
        features.feature_info.channels(), features.feature_info.reduction())]
    # by default the two T2T stages and the last block; without T2T, the last three blocks
    last = len(model.blocks) - 1
    assert features.feature_info.module_name() == (
        ['tokens_to_token.attention1', 'tokens_to_token.attention2', f'blocks.{last}'] if model.num_stem_stages
        else [f'blocks.{last - 2}', f'blocks.{last - 1}', f'blocks.{last}'])


@pytest.mark.parametrize('name', t2tvit.list_models())
def test_every_model_keeps_timms_factory_contract(name):
    """What timm's test_model_default_cfgs_non_std asks beyond shapes, on the meta device as timm runs it."""
    import fnmatch

    from timm.models._manipulate import group_parameters

    model = timm.create_model(name, device='meta', dtype=torch.float32).eval()
    placed = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert placed == {'meta'}  # the factory's device reaches every parameter and buffer
    assert model.in_chans == model.pretrained_cfg['input_size'][0] == 3
    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_a_model_arg=1)
    names = [n for n, _ in model.named_parameters()]
    assert all(any(fnmatch.fnmatch(n, pattern) for n in names) for pattern in model.no_weight_decay())
    assert len(set(group_parameters(model, model.group_matcher(coarse=False), reverse=True).values())) > 1
    h, w = model.pretrained_cfg['input_size'][1:]
    x = torch.randn(1, 3, h, w, device='meta')
    assert model.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # a new head takes the model's device, dtype and mode; a frozen model stays frozen
    model.to(dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert {(p.device.type, p.dtype) for p in model.head.parameters()} == {('meta', torch.float64)}
    assert not any(m.training for m in model.modules())
    model.requires_grad_(False)
    model.reset_classifier(0)
    assert not any(p.requires_grad for p in model.parameters())


def test_dtype_argument_builds_the_model_in_that_dtype_with_the_reference_table():
    from t2tvit.layers.pos_table import sinusoid_table

    model = timm.create_model(SMALL, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.pos_embed, sinusoid_table(65, 256).to(torch.bfloat16), rtol=0, atol=0)
    with torch.device('meta'):
        assert timm.create_model(SMALL).pos_embed.device.type == 'meta'
