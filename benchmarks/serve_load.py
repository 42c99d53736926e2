"""Dynamic batching of `t2tvit serve`, measured: images per second with 16 concurrent clients against one
client sending one request at a time, on loopback, the server and the clients on the same machine.

The script starts one server process (random weights saved to a temporary file; nothing is downloaded),
then alternates the two loads round by round, so that other work on the machine lands on both, and
prints each round and the median ratio. Every request is a 224x224 JPEG POSTed to /v1/predict; every
answer must be a 200.

    python benchmarks/serve_load.py                           # t2t_vit_7 at 224 px, 3 rounds
    python benchmarks/serve_load.py --model t2t_vit_lite_32   # the demo-size model
    python benchmarks/serve_load.py --clients 16 --requests 96 --rounds 5 --max-batch 16
    python benchmarks/serve_load.py -o benchmarks/RESULTS_serve.md   # also append the lines there
"""
import argparse
import http.client
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _jpeg() -> bytes:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    a = (rng.random((224, 224, 3)) * 60 + 90).astype('uint8')
    a[40:180, 60:160] = (200, 120, 40)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def _start(checkpoint: str, max_batch: int, max_wait_ms: float):
    env = dict(os.environ, PYTHONPATH=str(ROOT / 'src'), PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, '-m', 't2tvit', 'serve', '--checkpoint', checkpoint, '--port', '0',
                             '--max-batch', str(max_batch), '--max-wait-ms', str(max_wait_ms), '--max-queue', '256'],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        m = re.search(r'http://([\d.]+):(\d+)/', line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, m.group(1), int(m.group(2))
    raise SystemExit('the server did not start')


def _client(host: str, port: int, image: bytes, count: int) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=120)  # keep-alive, like any real client
    try:
        for _ in range(count):
            conn.request('POST', '/v1/predict?topk=5', body=image, headers={'Content-Type': 'image/jpeg'})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f'HTTP {r.status}')
    finally:
        conn.close()


def _images_per_s(host: str, port: int, image: bytes, clients: int, requests: int) -> float:
    per_client = max(1, requests // clients)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: _client(host, port, image, per_client), range(clients)))
    return clients * per_client / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='t2t_vit_7')
    p.add_argument('--clients', type=int, default=16)
    p.add_argument('--requests', type=int, default=64, help='requests per load per round (default 64)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--max-batch', type=int, default=16)
    p.add_argument('--max-wait-ms', type=float, default=5.0)
    p.add_argument('-o', '--output', metavar='MD', help='append what is printed to this markdown file')
    args = p.parse_args(argv)
    lines = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    sys.path.insert(0, str(ROOT / 'src'))
    import torch

    import t2tvit
    from t2tvit.checkpoint import save_model
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / 'model.safetensors')
        torch.manual_seed(0)
        save_model(t2tvit.create_model(args.model), checkpoint)
        proc, host, port = _start(checkpoint, args.max_batch, args.max_wait_ms)
        try:
            image = _jpeg()
            _images_per_s(host, port, image, 1, 4)  # warm-up: first forward passes, connection set-up
            _images_per_s(host, port, image, args.clients, 2 * args.clients)
            load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
            say(f'{args.model}, 224x224 JPEG requests, server --max-batch {args.max_batch} --max-wait-ms '
                f'{args.max_wait_ms:g}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
                f'torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}, '
                f'load average {load} at the start')
            ratios = []
            for r in range(args.rounds):
                one = _images_per_s(host, port, image, 1, max(8, args.requests // 4))
                many = _images_per_s(host, port, image, args.clients, args.requests)
                ratios.append(many / one)
                say(f'round {r + 1}: one at a time {one:.1f} img/s, {args.clients} concurrent clients '
                    f'{many:.1f} img/s: {many / one:.2f}x')
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request('GET', '/healthz')
            health = conn.getresponse().read().decode()
            say(f'server: {health}')
            say(f'batching gain (median of {args.rounds} rounds): {statistics.median(ratios):.2f}x')
        finally:
            proc.terminate()
            proc.wait(60)
    if args.output:
        with open(args.output, 'a') as f:
            f.write(f'\n`python benchmarks/serve_load.py {" ".join(argv if argv is not None else sys.argv[1:])}`\n\n')
            f.write(''.join(f'    {line}\n' for line in lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
