"""Runs the app under uvicorn: binds the socket first (so the printed URL has the real port, also for
``--port 0``), prints the URL once the model is loaded and the batcher runs, and on SIGTERM/SIGINT
stops accepting, answers every request in flight, then exits."""
import socket
import sys

from ..errors import UserError

GRACEFUL_SHUTDOWN_S = 30


def _need_web_stack():
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (uploads)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"t2tvit serve needs FastAPI, python-multipart and uvicorn ({e.name} is missing): "
                        "pip install 't2tvit[serve]'") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it a
    # keep-alive client waits out the 40 ms delayed ACK between a response's header and body writes
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f'cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host') from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    _need_web_stack()
    import uvicorn

    from .app import create_app
    from .model import load_served_model
    for flag in ('max_batch', 'max_queue'):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_wait_ms < 0:
        raise UserError(f'--max-wait-ms must be 0 or more, got {args.max_wait_ms}')
    from ..precision import InferencePrecision
    precision = InferencePrecision.from_args(args)
    served = load_served_model(args.model, args.checkpoint, args.pretrained, precision, args.device)
    if precision.compiles:
        print('compiling (--compile / --compile-stem)...', file=sys.stderr, flush=True)
        served.warm_up()
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f'[{host}]' if ':' in host else host

    def ready():
        print(f'serving {served.name} ({served.weights}, {served.precision.describe()}, {served.device}) '
              f'at http://{shown}:{port}/ (API docs at /docs); Ctrl-C stops it', flush=True)

    app = create_app(served, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                     on_ready=ready)
    config = uvicorn.Config(app, log_level='warning', timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            limit_concurrency=None, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after the graceful shutdown
        pass
    finally:
        sock.close()
    print('server stopped', file=sys.stderr, flush=True)
    return 0
