"""Released reference checkpoints load strictly and give the reference's logits."""
import pytest
import torch

import t2tvit
from t2tvit.analysis.profile import count_params
from conftest import load_json

PARITY_MODELS = ['t2t_vit_7', 't2t_vit_t_14']


@pytest.fixture(scope='module', params=PARITY_MODELS)
def reference_file(request, fixtures_dir, official_ckpt, tmp_path_factory):
    name = request.param
    spec = load_json(fixtures_dir / f'{name}.spec.json')
    path = tmp_path_factory.mktemp('ckpt') / f'{name}.pth.tar'
    official_ckpt.write_checkpoint(spec, str(path), layout='timm')
    return name, path, load_json(fixtures_dir / f'{name}.expected.json')


@pytest.mark.parametrize('attn_impl', ['sdpa', 'naive'])
def test_reference_checkpoint_gives_reference_logits(reference_file, official_ckpt, attn_impl):
    name, path, expected = reference_file
    model = t2tvit.create_model(name, checkpoint_path=str(path), attn_impl=attn_impl).eval()
    size = expected['input']['size']
    x = torch.from_numpy(official_ckpt.make_inputs(expected['input']['batch'], size))
    with torch.no_grad():
        tokens = model.forward_features(x)
        features = model.forward_head(tokens, pre_logits=True)
        logits = model.forward_head(tokens)
    torch.testing.assert_close(logits, torch.tensor(expected['logits']), atol=1e-4, rtol=0)
    torch.testing.assert_close(features, torch.tensor(expected['features']), atol=1e-4, rtol=0)
    assert logits.topk(5).indices.tolist() == expected['top5']
    # the reference counts its frozen pos_embed and Performer w as parameters; they are buffers here
    assert count_params(model) == expected['num_params']
    assert sum(t.numel() for t in model.state_dict().values()) == expected['num_params']
