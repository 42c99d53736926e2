"""The HTTP API and the page, on FastAPI (an ASGI app that uvicorn runs).

``POST /v1/predict`` and ``POST /v1/explain`` take a multipart upload (any file field) or the raw
image bytes. Every refusal is JSON ``{"error": "...", "status": N}``: 4xx for the client's input,
503 with ``Retry-After`` when the batching queue is full.
"""
import os
import time
from importlib import resources
from typing import Optional

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from ..errors import UserError
from .batching import Batcher, QueueFull
from .images import MAX_UPLOAD_BYTES, BadInput, check_content_type, decode_image, too_large
from .model import ServedModel

# a body past the limit is still read (and dropped) up to this size, so the client hears the 413 instead of a
# connection reset in the middle of its upload; past it the connection is closed
DRAIN_BYTES = 4 * MAX_UPLOAD_BYTES
STATIC = ('index.html', 'app.js', 'style.css')
MEDIA = {'.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css'}


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({'error': message, 'status': status}, status_code=status, headers=headers)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get('content-length')
    if declared and declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise too_large(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_UPLOAD_BYTES:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    if size > MAX_UPLOAD_BYTES:
        raise too_large(size)
    return b''.join(chunks)


async def _image_bytes(request: Request) -> bytes:
    kind = check_content_type(request.headers.get('content-type', ''))
    body = await _read_body(request)
    if kind == 'raw':
        return body

    async def replay():
        return {'type': 'http.request', 'body': body, 'more_body': False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as e:  # python-multipart's and Starlette's parse errors
        raise BadInput(400, f'the multipart body cannot be parsed ({e}); send it as curl -F file=@cat.jpg URL does')
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        raise BadInput(400, 'the multipart form has no file field: send curl -F file=@cat.jpg URL')
    data = await files[0].read()
    await form.close()
    return data


def create_app(served: ServedModel, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 64,
               on_ready=None) -> FastAPI:
    """The app serving ``served``; ``on_ready()`` is called once the batcher runs (the CLI prints the URL)."""
    from contextlib import asynccontextmanager

    batcher = Batcher(served.probabilities, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0,
                      max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        if on_ready is not None:
            on_ready()
        yield
        await batcher.close()  # after uvicorn has answered every request in flight

    app = FastAPI(title='t2tvit serve', version='1', lifespan=lifespan,
                  description=f'{served.name} ({served.weights}): top-k classes and attention pictures of images.')
    app.state.batcher = batcher
    app.state.served = served

    _add_error_handlers(app)
    _add_api(app, served, batcher)
    _add_page(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answers JSON ``{"error", "status"}``: the client's mistakes 4xx, a full queue 503."""
    @app.exception_handler(BadInput)
    async def _bad_input(_request, e: BadInput):
        return _error(e.status, e.message)

    @app.exception_handler(QueueFull)
    async def _queue_full(_request, e: QueueFull):
        return _error(503, str(e), {'Retry-After': str(e.retry_after_s)})

    @app.exception_handler(UserError)
    async def _user_error(_request, e: UserError):
        return _error(422, str(e))

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):  # a bug, not the client's input: still JSON, and the server goes on
        return _error(500, f'internal error ({type(e).__name__}: {str(e)[:300]})')

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        where = ', '.join(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return _error(422, f'invalid request ({where})')


def _add_api(app: FastAPI, served: ServedModel, batcher: Batcher) -> None:
    """/v1/predict, /v1/explain, /v1/model, /healthz and the samples."""
    # decoding runs on as many threads as there are cores: more only makes every image in a burst finish late
    decoders = anyio.CapacityLimiter(os.cpu_count() or 1)

    def decode(data: bytes):
        return served.preprocess(decode_image(data))

    async def _input(request: Request):
        return await anyio.to_thread.run_sync(decode, await _image_bytes(request), limiter=decoders)

    @app.post('/v1/predict', summary='top-k classes of an image')
    async def predict(request: Request, topk: int = Query(5, ge=1, le=1000, description='classes to return')):
        start = time.perf_counter()
        with batcher.arriving():
            x = await _input(request)
        probs = await batcher.submit(x)
        p, idx = probs.topk(min(topk, probs.numel()))
        return {'model': served.name,
                'topk': [{'index': int(i), 'label': served.class_names[i], 'prob': round(float(q), 6)}
                         for q, i in zip(p.tolist(), idx.tolist())],
                'ms': round(1000 * (time.perf_counter() - start), 2)}

    @app.post('/v1/explain', summary='attention rollout over the image (or the T2T feature maps), as PNG',
              response_class=Response, responses={200: {'content': {'image/png': {}}}})
    async def explain(request: Request, view: str = Query('rollout', pattern='^(rollout|features)$',
                                                          description='rollout: attention rollout overlay; '
                                                                      "features: the T2T stages' feature maps")):
        x = await _input(request)
        picture = served.rollout_png if view == 'rollout' else served.features_png
        return Response(await batcher.exclusive(lambda: picture(x)), media_type='image/png')

    @app.get('/v1/model', summary="the model's name, classes, input size and preprocessing")
    async def model_info():
        return {**served.describe(), 'max_batch': batcher.max_batch, 'max_queue': batcher.max_queue,
                'max_upload_bytes': MAX_UPLOAD_BYTES}

    @app.get('/healthz', summary='liveness, with the queue and batch counts')
    async def healthz():
        return {'status': 'ok', 'pending': batcher.pending, 'arriving': batcher.arriving_now,
                **batcher.stats.as_json()}

    @app.get('/v1/samples', summary='the built-in sample images')
    async def sample_list():
        from .samples import samples
        return [{'name': n, 'url': f'/samples/{n}.png', 'description': d} for n, (_, d) in samples().items()]

    @app.get('/samples/{name}.png', include_in_schema=False)
    async def sample(name: str):
        from .samples import samples
        if name not in samples():
            return _error(404, f'no sample {name!r} (GET /v1/samples lists them)')
        return Response(samples()[name][0], media_type='image/png')


def _add_page(app: FastAPI) -> None:
    """The page at ``/`` and its files, read once from the package."""
    page = {name: resources.files(__package__).joinpath('static', name).read_bytes() for name in STATIC}

    @app.get('/', include_in_schema=False)
    async def index():
        return HTMLResponse(page['index.html'])

    @app.get('/static/{name}', include_in_schema=False)
    async def static(name: str):
        if name not in page:
            return _error(404, f'no file {name!r}')
        return Response(page[name], media_type=MEDIA['.' + name.rsplit('.', 1)[-1]])
