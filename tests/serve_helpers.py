"""A `t2tvit serve` process on a free loopback port, and a small HTTP client (the standard library's)."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from conftest import ROOT

DIGITS = [str(i) for i in range(10)]


def save_small_model(path: Path, seed: int = 0) -> Path:
    """A seeded t2t_vit_lite_32 (32 px, 10 classes named '0'..'9') in t2tvit's checkpoint format."""
    import torch

    import t2tvit
    from t2tvit.checkpoint import save_model
    torch.manual_seed(seed)
    save_model(t2tvit.create_model('t2t_vit_lite_32', num_classes=10), path, class_names=DIGITS)
    return path


class Server:
    """``t2tvit serve ARGS --port 0`` in a child process; ``url`` once it printed that it serves."""

    def __init__(self, args: List[str], cwd: Optional[Path] = None, timeout: float = 120.0):
        env = dict(os.environ, PYTHONPATH=str(ROOT / 'src'), OMP_NUM_THREADS='2', PYTHONUNBUFFERED='1')
        self.proc = subprocess.Popen([sys.executable, '-m', 't2tvit', 'serve', *args, '--port', '0'], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: List[str] = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if 'serving ' in line:
                    found.set()
            found.set()
        threading.Thread(target=read, daemon=True).start()
        found.wait(timeout)
        match = re.search(r'http://([\d.]+):(\d+)/', ''.join(self.lines))
        if not match:
            self.stop()
            raise RuntimeError(f'the server did not start: {"".join(self.lines)} {self.proc.stderr.read()}')
        self.host, self.port = match.group(1), int(match.group(2))
        self.url = f'http://{self.host}:{self.port}'

    def request(self, method: str, path: str, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
                timeout: float = 60.0) -> Tuple[int, Dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body if method == 'POST' else None, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def post_image(self, data: bytes, path: str = '/v1/predict', content_type: str = 'image/png'):
        status, headers, body = self.request('POST', path, data, {'Content-Type': content_type})
        return status, headers, (json.loads(body) if headers.get('content-type') == 'application/json' else body)

    def get_json(self, path: str):
        status, _, body = self.request('GET', path)
        return status, json.loads(body)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        """Poll /healthz until ``predicate(health)`` holds; the last health."""
        end = time.monotonic() + timeout
        while True:
            _, health = self.get_json('/healthz')
            if predicate(health) or time.monotonic() > end:
                return health
            time.sleep(0.05)


class SlowUpload:
    """A POST whose body is sent in two parts: between them the request is in flight, still arriving."""

    def __init__(self, server: Server, data: bytes, path: str = '/v1/predict?topk=1'):
        import socket
        self.sock = socket.create_connection((server.host, server.port), timeout=60)
        head = (f'POST {path} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: image/png\r\n'
                f'Content-Length: {len(data)}\r\nConnection: close\r\n\r\n').encode()
        self.sock.sendall(head + data[:16])
        self.rest = data[16:]

    def finish(self) -> Tuple[int, dict]:
        """Send the rest; the response's status and JSON body."""
        self.sock.sendall(self.rest)
        chunks = []
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        self.sock.close()
        head, _, body = b''.join(chunks).partition(b'\r\n\r\n')
        return int(head.split()[1]), json.loads(body)


def multipart(data: bytes, filename: str = 'image.png', field: str = 'file') -> Tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type."""
    boundary = 't2tvit-test-boundary'
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
    return body, f'multipart/form-data; boundary={boundary}'
