"""`t2tvit serve`: the HTTP API answers as the model does, batches concurrent requests, refuses bad input
with a 4xx JSON reason and keeps serving, answers 503 + Retry-After when full, and finishes requests in
flight on SIGTERM. Each test runs a real server process on a loopback port."""
import io
import re
import signal
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('fastapi', reason="t2tvit serve needs FastAPI (pip install 't2tvit[serve]')")
pytest.importorskip('uvicorn', reason="t2tvit serve needs uvicorn (pip install 't2tvit[serve]')")

from serve_helpers import DIGITS, Server, SlowUpload, multipart, save_small_model  # noqa: E402


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def _digit() -> Image.Image:
    from t2tvit.serve.samples import samples
    return Image.open(io.BytesIO(samples()['digit_4'][0])).convert('RGB')


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (its data is one tiny row): a decompression bomb's shape."""
    raw = zlib.compress(b'\x00' + b'\x00' * 4)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', raw) + chunk(b'IEND', b'')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp('serve') / 'digits.safetensors')


@pytest.fixture(scope='module')
def server(checkpoint):
    s = Server(['--checkpoint', str(checkpoint), '--max-wait-ms', '20'])
    yield s
    s.stop()


def _expected(checkpoint, image: Image.Image) -> torch.Tensor:
    from t2tvit.serve.model import load_served_model
    served = load_served_model(None, str(checkpoint), device='cpu')
    return served.probabilities(served.preprocess(image)[None])[0]


def _probs(answer: dict) -> dict:
    return {t['index']: t['prob'] for t in answer['topk']}


def test_predict_answers_what_the_model_computes(server, checkpoint):
    status, _, answer = server.post_image(_png(_digit()), '/v1/predict?topk=10')
    assert status == 200, answer
    assert answer['model'] == 't2t_vit_lite_32' and answer['ms'] > 0
    assert [t['label'] for t in answer['topk']] == [DIGITS[t['index']] for t in answer['topk']]
    expected = _expected(checkpoint, _digit())
    got = torch.tensor([_probs(answer)[i] for i in range(10)])
    assert torch.allclose(got, expected, atol=2e-6), (got, expected)
    probs = [t['prob'] for t in answer['topk']]
    assert probs == sorted(probs, reverse=True)


def test_multipart_and_raw_bytes_get_the_same_answer(server):
    body, ctype = multipart(_png(_digit()), 'four.png')
    status, _, by_form = server.post_image(body, '/v1/predict?topk=3', ctype)
    assert status == 200, by_form
    _, _, raw = server.post_image(_png(_digit()), '/v1/predict?topk=3', 'application/octet-stream')
    assert by_form['topk'] == raw['topk'] and len(raw['topk']) == 3


def test_model_health_samples_and_openapi(server):
    status, info = server.get_json('/v1/model')
    assert status == 200
    assert info['model'] == 't2t_vit_lite_32' and info['class_names'] == DIGITS and info['input_size'] == [3, 32, 32]
    assert set(info['preprocessing']) == {'img_size', 'mean', 'std', 'crop_pct', 'interpolation'}
    assert server.get_json('/healthz')[1]['status'] == 'ok'
    status, listed = server.get_json('/v1/samples')
    assert status == 200 and {'digit_4', 'sunny_field'} <= {s['name'] for s in listed}
    status, headers, png = server.request('GET', listed[0]['url'])
    assert status == 200 and Image.open(io.BytesIO(png)).size[0] > 0
    status, api = server.get_json('/openapi.json')
    assert {'/v1/predict', '/v1/explain', '/v1/model', '/healthz'} <= set(api['paths'])
    status, headers, page = server.request('GET', '/')
    assert status == 200 and b'/static/app.js' in page
    for name in ('app.js', 'style.css'):
        status, _, text = server.request('GET', f'/static/{name}')
        assert status == 200
        page += text
    assert b'http://' not in page and b'https://' not in page  # nothing from elsewhere: works offline


def test_explain_returns_the_rollout_overlay_and_the_t2t_feature_maps(server):
    status, headers, png = server.post_image(_png(_digit()), '/v1/explain')
    assert status == 200 and headers['content-type'] == 'image/png'
    overlay = Image.open(io.BytesIO(png))
    assert overlay.size == (256, 256)  # the 32 px input, enlarged 8x
    a = np.asarray(overlay.convert('RGB')).astype(int)
    assert a.std() > 10  # an overlay, not a flat picture
    status, headers, png = server.post_image(_png(_digit()), '/v1/explain?view=features')
    assert status == 200 and Image.open(io.BytesIO(png)).size[0] > 300
    status, _, err = server.post_image(_png(_digit()), '/v1/explain?view=nope')
    assert status == 422 and 'view' in err['error']


def _bad_inputs():
    digit = _digit()
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    jpeg = _jpeg(photo)
    return [
        ('not an image', b'this is a text file, not a picture\n' * 20, 'image/png', 400, 'not an image'),
        ('truncated JPEG', jpeg[:len(jpeg) // 2], 'image/jpeg', 400, 'truncated'),
        ('empty body', b'', 'image/png', 400, 'empty body'),
        ('wrong content type', _png(digit), 'application/json', 415, 'content type'),
        ('upload over 20 MB', b'\xff\xd8' + bytes(21 * 1024 * 1024), 'image/jpeg', 413, '20 MB'),
        ('decompression bomb', _bomb_png(10000, 10000), 'image/png', 413, 'decompression bomb'),
        ('decompression bomb, 2x the limit', _bomb_png(20000, 10000), 'image/png', 413, 'decompression bomb'),
        ('multipart without a file', b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
         'multipart/form-data; boundary=b', 400, 'no file field'),
    ]


@pytest.mark.parametrize('case', _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, case):
    _, data, ctype, want, words = case
    status, headers, body = server.post_image(data, '/v1/predict', ctype)
    assert status == want, body
    assert headers['content-type'] == 'application/json' and body['status'] == want and words in body['error']
    status, _, good = server.post_image(_png(_digit()), '/v1/predict?topk=1')
    assert status == 200 and good['topk'][0]['label'] in DIGITS


def test_grayscale_cmyk_and_alpha_images_are_converted(server):
    digit = _digit()
    _, _, rgb = server.post_image(_png(digit), '/v1/predict?topk=10')
    gray = digit.convert('L')
    rgba = digit.convert('RGBA')  # opaque: the same pixels
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # 16-bit grayscale, full range
    for img in (gray, rgba, sixteen):
        status, _, answer = server.post_image(_png(img), '/v1/predict?topk=10')
        assert status == 200, (img.mode, answer)
        for i, p in _probs(rgb).items():
            assert abs(_probs(answer)[i] - p) < 1e-5, img.mode
    cmyk = Image.new('CMYK', (40, 40), (0, 200, 200, 0))
    status, _, answer = server.post_image(_jpeg(cmyk), '/v1/predict', 'image/jpeg')
    assert status == 200 and len(answer['topk']) == 5
    transparent = Image.new('RGBA', (40, 40), (0, 0, 0, 0))  # shown on white, as a viewer does
    _, _, on_white = server.post_image(_png(transparent), '/v1/predict?topk=10')
    _, _, white = server.post_image(_png(Image.new('RGB', (40, 40), 'white')), '/v1/predict?topk=10')
    assert on_white['topk'] == white['topk']


def test_concurrent_requests_run_as_batches_with_the_same_answers(checkpoint):
    s = Server(['--checkpoint', str(checkpoint), '--max-batch', '8', '--max-wait-ms', '500'])
    try:
        rng = np.random.default_rng(1)
        images = [_png(Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))) for _ in range(8)]
        alone = [s.post_image(img, '/v1/predict?topk=10')[2] for img in images]
        before = s.get_json('/healthz')[1]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda img: s.post_image(img, '/v1/predict?topk=10')[2], images))
        after = s.get_json('/healthz')[1]
        assert after['images'] - before['images'] == 8
        assert after['batches'] - before['batches'] < 8  # 8 requests within the 500 ms window: fewer forward passes
        for a, b in zip(alone, together):
            assert [t['index'] for t in a['topk'][:3]] == [t['index'] for t in b['topk'][:3]]
            for i, p in _probs(a).items():
                assert abs(_probs(b)[i] - p) < 1e-5
    finally:
        s.stop()


def test_serve_predicts_in_the_precision_it_is_given_and_explains_in_float32(checkpoint):
    # bf16 weights cast once, the fused stem, the model compiled (frozen) before the server listens: batch sizes 1
    # and 2 at start, then any size runs the dynamic graph
    s = Server(['--checkpoint', str(checkpoint), '--dtype', 'bf16', '--cast-weights', '--fused-stem', '--compile',
                '--max-batch', '8', '--max-wait-ms', '500'], timeout=300)
    try:
        status, info = s.get_json('/v1/model')
        assert status == 200 and info['precision'] == 'bf16 (weights cast once), fused stem, compiled (frozen)'
        assert [info[k] for k in ('dtype', 'cast_weights', 'fused_stem', 'compile_stem', 'compile')] == [
            'bf16', True, True, False, True]
        rng = np.random.default_rng(2)
        images = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda img: s.post_image(_png(img), '/v1/predict?topk=10'), images))
        for image, (status, _, answer) in zip(images, answers):
            assert status == 200, answer
            expected = _expected(checkpoint, image)  # float32
            got = torch.tensor([_probs(answer)[i] for i in range(10)])
            assert (got - expected).abs().max() < 1e-2 and (got - expected).abs().max() > 0  # bf16, not float32
        status, headers, png = s.post_image(_png(_digit()), '/v1/explain')
        assert status == 200 and headers['content-type'] == 'image/png'
    finally:
        s.stop()


def test_an_int8_server_model_keeps_float32_weights_for_its_pictures(checkpoint):
    from t2tvit.precision import InferencePrecision
    from t2tvit.serve.model import load_served_model
    served = load_served_model(None, str(checkpoint), precision=InferencePrecision('int8'), device='cpu')
    kinds = {type(m) for m in served.fast.blocks.modules() if type(m).__name__ == 'Linear'}
    assert kinds and all('quantized.dynamic' in kind.__module__ for kind in kinds)
    assert all(p.dtype == torch.float32 for p in served.model.parameters())
    assert any(type(m) is torch.nn.Linear for m in served.model.blocks.modules())
    x = served.preprocess(_digit())[None]
    expected = _expected(checkpoint, _digit())
    assert (served.probabilities(x)[0] - expected).abs().max() < 1e-2
    assert served.describe()['precision'] == 'int8' and served.rollout_png(x[0])[:4] == b'\x89PNG'


def test_a_request_that_comes_alone_does_not_wait_for_the_window(checkpoint):
    s = Server(['--checkpoint', str(checkpoint), '--max-wait-ms', '5000'])
    try:
        import time
        s.post_image(_png(_digit()))
        start = time.perf_counter()
        status, _, answer = s.post_image(_png(_digit()))
        assert status == 200 and time.perf_counter() - start < 4.0  # not the 5 s window: nothing else was arriving
    finally:
        s.stop()


def test_a_full_queue_answers_503_with_retry_after(checkpoint):
    # an upload still in progress makes a batch wait (3 s at most) for it: two requests fill the queue of 2,
    # the third is refused at once
    s = Server(['--checkpoint', str(checkpoint), '--max-batch', '4', '--max-queue', '2', '--max-wait-ms', '3000'])
    try:
        slow = SlowUpload(s, _png(_digit()))
        assert s.wait_for(lambda h: h['arriving'] == 1)['arriving'] == 1
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.post_image(_png(_digit()))[0])) for _ in range(2)]
        for t in threads:
            t.start()
        assert s.wait_for(lambda h: h['pending'] == 2)['pending'] == 2
        status, headers, body = s.post_image(_png(_digit()))
        assert status == 503 and int(headers['retry-after']) >= 1 and '--max-queue' in body['error']
        for t in threads:
            t.join(60)
        assert results == [200, 200]
        assert slow.finish()[0] == 200
        assert s.get_json('/healthz')[1]['refused'] == 1
        assert s.post_image(_png(_digit()))[0] == 200
    finally:
        s.stop()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_shutdown_finishes_the_requests_in_flight(checkpoint, sig):
    # one request waits in the batch window for an upload still in progress; the signal comes, then the
    # upload ends: both are answered, and only then does the server exit
    s = Server(['--checkpoint', str(checkpoint), '--max-wait-ms', '2000'])
    slow = SlowUpload(s, _png(_digit()))
    assert s.wait_for(lambda h: h['arriving'] == 1)['arriving'] == 1
    answers = []
    t = threading.Thread(target=lambda: answers.append(s.post_image(_png(_digit()), '/v1/predict?topk=1')))
    t.start()
    assert s.wait_for(lambda h: h['pending'] == 1)['pending'] == 1
    s.proc.send_signal(sig)
    status, body = slow.finish()
    t.join(60)
    code = s.proc.wait(60)
    assert status == 200 and body['topk'][0]['label'] in DIGITS
    assert answers and answers[0][0] == 200 and answers[0][2]['topk'][0]['label'] in DIGITS
    assert code in (0, -sig, 128 + sig)
    with pytest.raises(OSError):
        s.request('GET', '/healthz', timeout=5)


def test_serve_mistakes_end_with_one_line(tmp_path, capsys):
    from t2tvit.cli import main
    assert main(['serve', '--checkpoint', str(tmp_path / 'missing.pth')]) == 2
    err = capsys.readouterr().err
    assert 'no such checkpoint file' in err and len(err.strip().splitlines()) == 1
    assert main(['serve', '--checkpoint', str(tmp_path / 'x.pth'), '--max-batch', '0']) == 2
    assert '--max-batch must be at least 1' in capsys.readouterr().err


def test_serve_reports_a_busy_port(checkpoint, capsys):
    import socket
    from t2tvit.cli import main
    busy = socket.socket()
    busy.bind(('127.0.0.1', 0))
    busy.listen(1)
    try:
        assert main(['serve', '--checkpoint', str(checkpoint), '--port', str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    assert 'choose another --port' in capsys.readouterr().err


def test_serve_load_benchmark_runs_and_records_its_rounds(tmp_path):
    # the README's batching benchmark, at its smallest: every answer a 200, the rounds printed and appended
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'serve_load.py'
    out = tmp_path / 'serve.md'
    args = ['--model', 't2t_vit_lite_32', '--clients', '2', '--requests', '4', '--rounds', '1', '-o', str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r'round 1: one at a time [\d.]+ img/s, 2 concurrent clients [\d.]+ img/s', done.stdout)
    assert re.search(r'batching gain \(median of 1 rounds\): [\d.]+x', done.stdout)
    written = out.read_text()
    assert f'`python benchmarks/serve_load.py {" ".join(args)}`' in written and 'batching gain' in written
