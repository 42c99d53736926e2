"""Exported models (ONNX in onnxruntime, TorchScript, torch.export) give PyTorch's logits."""
import pytest
import torch

import t2tvit
from conftest import fixture_model, load_json
from t2tvit.cli import main
from t2tvit.export import TOLERANCE, export_model, load_exported, max_abs_diff
from t2tvit.models import PAPER_RESULTS


def _need_onnxruntime():
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install onnxruntime)')
    pytest.importorskip('onnxscript', reason='the ONNX exporter needs onnxscript (pip install onnxscript)')


def _check_onnx(name, fixtures_dir, official_ckpt, tmp_path):
    model = fixture_model(name, fixtures_dir, official_ckpt)
    path = export_model(model, 'onnx', tmp_path / f'{name}.onnx', dynamic_batch=True)
    x = torch.from_numpy(official_ckpt.make_inputs(3, model.img_size[0]))
    assert max_abs_diff(model, load_exported(path, 'onnx'), x) <= TOLERANCE


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_onnx_in_onnxruntime_matches_pytorch(name, fixtures_dir, official_ckpt, tmp_path):
    _need_onnxruntime()
    _check_onnx(name, fixtures_dir, official_ckpt, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(PAPER_RESULTS))
def test_onnx_in_onnxruntime_matches_pytorch_every_paper_model(name, fixtures_dir, official_ckpt, tmp_path):
    _need_onnxruntime()
    _check_onnx(name, fixtures_dir, official_ckpt, tmp_path)


@pytest.mark.parametrize('fmt', ['torchscript', 'exported'])
def test_torchscript_and_export_program_match_pytorch_at_any_batch(fmt, tmp_path):
    torch.manual_seed(0)
    model = t2tvit.create_model('t2t_vit_7', img_size=32).eval()
    path = export_model(model, fmt, tmp_path / f'm.{fmt}.{"pt2" if fmt == "exported" else "pt"}', dynamic_batch=True)
    loaded = load_exported(path, fmt)
    for batch in (1, 3):
        assert max_abs_diff(model, loaded, torch.randn(batch, 3, 32, 32)) <= TOLERANCE


def test_export_command_writes_a_checked_file(fixtures_dir, official_ckpt, tmp_path, capsys):
    spec = load_json(fixtures_dir / 't2t_vit_7.spec.json')
    ckpt = official_ckpt.write_checkpoint(spec, str(tmp_path / 't2t_vit_7.pth.tar'))
    out = tmp_path / 'model.pt2'
    code = main(['export', '--model', 't2t_vit_7', '--checkpoint', ckpt, '--format', 'exported', '-o', str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert 'within' in printed


def test_export_command_rejects_bad_requests(tmp_path, capsys):
    assert main(['export', '--model', 't2t_vit_7', '--opset', '13', '-o', str(tmp_path / 'm.onnx')]) == 2
    assert 'opset 17 or newer' in capsys.readouterr().err
    assert main(['export', '--model', 't2t_vit_7', '--format', 'exported', '-o', str(tmp_path / 'm.pt')]) == 2
    assert '.pt2' in capsys.readouterr().err
    assert main(['export', '--model', 't2t_vit_77']) == 2
