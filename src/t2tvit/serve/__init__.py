"""``t2tvit serve``: a model behind a local web page and an HTTP API, with dynamic batching.

``app`` (FastAPI routes), ``batching`` (requests that arrive together run as one batch, a bounded
queue), ``images`` (request bodies to images, bad input to 4xx), ``model`` (weights, preprocessing,
explain pictures), ``samples`` (built-in images), ``static/`` (the page: plain HTML/JS, no CDN).
FastAPI and uvicorn come with ``pip install 't2tvit[serve]'``; nothing else in t2tvit needs them.
"""


def run_serve(args) -> int:
    """The CLI's entry point (``args`` from ``t2tvit serve``)."""
    from .server import run_serve as run
    return run(args)
