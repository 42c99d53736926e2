"""Speed and memory of one training or inference step, measured the same way on CPU and GPU.

A step is one forward pass (``infer``, under ``torch.inference_mode``) or forward, cross
entropy, backward and AdamW update (``train``) on a random batch, optionally under
bf16/fp16 autocast and ``torch.compile(fullgraph=True)``. After warm-up steps the timed
steps give the median ms/step and img/s. The other figures:

- ``peak_mem_mb``: memory a step needs above what is resident before it (weights,
  optimizer state, the batch). On CUDA the growth of ``torch.cuda.max_memory_allocated``;
  on CPU the growth of the peak RSS (``VmHWM``) in a fresh process, where glibc is told to
  hand every large block back to the system so a warm-up step does not hide the next one.
- ``gflops_per_s``: the model's forward MACs (those of ``t2tvit profile``), 2 FLOPs each,
  times the batch, times 3 for a training step (backward costs two forwards), over the
  median step time.
- ``matmul_peak_gflops``: the best rate of large square matmuls in the step's dtype on the
  same device, measured between the timed steps of the same run; ``peak_fraction`` pairs
  each step with the matmul burst after it, so a busy moment of the machine slows both.

``run_pair`` times two configurations step by step in turn (A, B, A, B, ...) so that
drift of a shared machine lands on both; ``benchmarks/compare.py`` builds its table on it.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..precision import INFER_DTYPES, InferencePrecision
from .benchmark_keys import JSON_FIELDS, JSON_KEYS  # noqa: F401  (JSON_KEYS: the public name)

MODES = ('infer', 'train')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# int8: the blocks' and head's Linear layers dynamically quantized (t2tvit.quantize), CPU inference only
DEVICES = ('cpu', 'cuda')


@dataclass
class BenchmarkConfig:
    model: str
    mode: str = 'infer'
    batch: int = 32
    img_size: int | None = None  # the model's default when None
    dtype: str = 'fp32'
    attn: str = 'sdpa'
    compile: bool = False
    device: str = 'cpu'
    steps: int = 5
    warmup: int = 2
    grad_checkpointing: bool = False
    # training: 'lean' keeps LayerNorm/GELU inputs for backward, not their outputs (layers/lean.py);
    # 'plain' is autograd's own saving; '' picks lean for sdpa and plain for naive, the reference math
    activations: str = ''
    # bf16/fp16 inference: weights and input cast once (model.to(dtype)) instead of autocast's per-call casts
    cast_weights: bool = False
    # inference with the soft splits as strided convolutions (T2TViT.set_fused_stem)
    fused_stem: bool = False
    # the T2T stem through torch.compile, the blocks eager (T2TViT.set_compiled_stem): the fused path with
    # fused_stem, else the unfold path (training too)
    compile_stem: bool = False

    @property
    def precision(self) -> InferencePrecision:
        """The inference dtype and stem paths, as ``t2tvit predict`` and ``serve`` take them."""
        return InferencePrecision(self.dtype, self.cast_weights, self.fused_stem, self.compile_stem,
                                  self.compile and self.mode == 'infer')

    @property
    def lean(self) -> bool:
        return self.activations == 'lean' or (not self.activations and self.attn == 'sdpa')

    def validate(self) -> 'BenchmarkConfig':
        from ..factory import list_models
        from ..layers.attention import ATTN_IMPLS
        if self.model not in list_models():
            raise UserError(f'unknown model {self.model!r}; run `t2tvit models` for the list')
        for name, value, allowed in (('mode', self.mode, MODES), ('dtype', self.dtype, INFER_DTYPES),
                                     ('attn', self.attn, ATTN_IMPLS), ('device', self.device, DEVICES)):
            if value not in allowed:
                raise UserError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
        if self.activations not in ('', 'lean', 'plain'):
            raise UserError(f'--activations {self.activations!r} is not one of lean, plain')
        if self.mode == 'train' and (self.dtype == 'int8' or self.cast_weights or self.fused_stem):
            raise UserError('--dtype int8, --cast-weights and --fused-stem are inference paths: drop --mode train')
        if self.fused_stem and self.attn != 'sdpa':
            raise UserError('--fused-stem is a path of the sdpa model: drop --attn naive')
        # the rules predict, validate and serve follow (--compile with --compile-stem refused in training too)
        dataclasses.replace(self.precision, compile=self.compile).check(self.device)
        if self.batch < 1 or self.steps < 1 or self.warmup < 0:
            raise UserError('--batch-size and --steps must be at least 1 (and --warmup at least 0)')
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise UserError('--device cuda: torch sees no CUDA device here (use --device cpu)')
        return self


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    img_size: int
    step_ms: list[float]
    flops_per_step: float
    matmul_gflops: list[float]  # one matmul burst after each timed step
    peak_mem_mb: float | None = None
    first_step_s: float = 0.0  # includes compilation when config.compile or config.compile_stem
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def img_per_s(self) -> float:
        return self.config.batch / (self.ms_per_step / 1e3)

    @property
    def gflops_per_s(self) -> float:
        return self.flops_per_step / (self.ms_per_step / 1e3) / 1e9

    @property
    def matmul_peak_gflops(self) -> float:
        return max(self.matmul_gflops)

    @property
    def peak_fraction(self) -> float:
        """The model's rate over the matmul rate, step by step (median over the timed steps)."""
        return statistics.median(self.flops_per_step / (ms / 1e3) / 1e9 / peak
                                 for ms, peak in zip(self.step_ms, self.matmul_gflops))

    @property
    def compile_s(self) -> float:
        """Time of the first call beyond a normal step: the compilation of ``torch.compile``."""
        return max(0.0, self.first_step_s - self.ms_per_step / 1e3)

    def to_json(self) -> dict[str, object]:
        """One flat JSON object with the keys of ``benchmark_keys.JSON_FIELDS``, in their order."""
        row: dict[str, object] = {}
        for key, digits in JSON_FIELDS.items():
            value = getattr(self, key) if hasattr(self, key) else getattr(self.config, key)
            row[key] = value if digits is None or value is None else round(value, digits)
        return row


def model_img_size(model: str) -> int:
    """The image size a registered model is built for by default (its table entry's), 224 for other models."""
    from ..registry import list_models, model_entry
    size = model_entry(model).config.get('img_size', 224) if model in list_models() else 224
    return size if isinstance(size, int) else size[0]


def matmul_dtype(cfg: BenchmarkConfig) -> str:
    """The dtype whose matmul rate a step is compared with (int8 steps: float32's)."""
    return cfg.dtype if cfg.dtype in DTYPES else 'fp32'


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class StepRunner:
    """One model, one random batch and one step function, ready to be timed.

    ``model``: another network (a timm model of ``--compare``) run with ``cfg``'s batch, dtype and mode.
    """

    def __init__(self, cfg: BenchmarkConfig, seed: int = 0, model: torch.nn.Module | None = None):
        from ..factory import create_model
        self.cfg = cfg.validate() if model is None else cfg
        self.img_size = cfg.img_size or model_img_size(cfg.model)
        self.device = torch.device(cfg.device)
        torch.manual_seed(seed)
        precision = cfg.precision
        if model is None:
            model = create_model(cfg.model, img_size=self.img_size, attn_impl=cfg.attn)
            model.set_lean_activations(cfg.lean)
        else:  # a timm model of --compare: no T2T stem
            precision = dataclasses.replace(precision, fused_stem=False, compile_stem=False)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.x = torch.randn(cfg.batch, 3, self.img_size, self.img_size, device=self.device)
        if cfg.mode == 'infer':
            # the model predict, validate and serve run: weights cast or quantized once, the stem flags set,
            # --compile with inductor's freezing
            self.forward = precision.prepare(model, self.device, cfg.model)
            self.x = self.x.to(precision.input_dtype)
            model = getattr(self.forward, '_orig_mod', self.forward)  # --breakdown times the eager stages
        else:
            if precision.compile_stem:
                model.set_compiled_stem(True)
            model = model.to(self.device).train()
            self.forward = torch.compile(model, fullgraph=True) if cfg.compile else model
            self.y = torch.randint(0, model.num_classes, (cfg.batch,), device=self.device)
            self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            self.scaler = torch.amp.GradScaler(cfg.device, enabled=cfg.dtype == 'fp16')
        self.model, self.precision = model, precision
        self.last_loss: float | None = None

    def step(self):
        cfg = self.cfg
        if cfg.mode == 'infer':
            with torch.inference_mode(), self.precision.autocast(self.device):
                self.forward(self.x)
        else:
            with self.precision.autocast(self.device):
                loss = F.cross_entropy(self.forward(self.x), self.y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.last_loss = loss.detach()
        _sync(self.device)

    def timed_step(self) -> float:
        """Seconds of one step."""
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        return time.perf_counter() - t0


def forward_flops(model: str, img_size: int) -> float:
    """FLOPs of one image's forward pass: the MACs of ``t2tvit profile`` (meta device), 2 FLOPs each."""
    from .profile import profile
    return 2.0 * profile(model, img_size=img_size).macs


def matmul_peak_gflops(dtype: str = 'fp32', device: str = 'cpu', budget_s: float = 0.6) -> float:
    """Best GFLOP/s of square matmuls (up to 2048) in ``dtype`` on ``device``, within about ``budget_s``."""
    dev = torch.device(device)
    best = 0.0
    for n in (512, 1024, 2048):
        a = torch.randn(n, n, device=dev).to(DTYPES[dtype])
        b = torch.randn(n, n, device=dev).to(DTYPES[dtype])
        a @ b
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        once = time.perf_counter() - t0
        reps = max(1, min(50, int(budget_s / 3 / max(once, 1e-6))))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(dev)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
        if once > budget_s / 3:  # slow kernels (fp16 on most CPUs): a bigger size only costs time
            break
    return best


# -- peak memory ---------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Make ``VmHWM`` restart from the current RSS (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def step_peak_mem_mb(runner: StepRunner) -> float:
    """Peak memory of one step above what is resident before it, measured in this process."""
    if runner.device.type == 'cuda':
        torch.cuda.synchronize(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        runner.step()
        return (torch.cuda.max_memory_allocated(runner.device) - base) / 2 ** 20
    import resource
    rss = _proc_status_kb('VmRSS')
    if rss is not None and _reset_peak_rss():
        runner.step()
        return (_proc_status_kb('VmHWM') - rss) / 1024
    # without /proc: the lifetime peak, which the warm-up may already have set
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def peak_mem_mb(cfg: BenchmarkConfig, timeout_s: float = 1800) -> float:
    """Peak memory of one step; on CPU in a fresh process, so that nothing else has touched the heap."""
    if cfg.device == 'cuda':
        runner = StepRunner(cfg)
        runner.step()
        return step_peak_mem_mb(runner)
    env = dict(os.environ)
    # glibc returns blocks above this size to the system on free, so RSS follows the live tensors
    env['MALLOC_MMAP_THRESHOLD_'] = str(128 * 1024)
    env['MALLOC_TRIM_THRESHOLD_'] = str(128 * 1024)
    env.setdefault('OMP_NUM_THREADS', str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, '-m', 't2tvit.analysis.benchmark', '--peak-mem', json.dumps(asdict(cfg))],
                          capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f'memory probe for {cfg.model} failed (exit {proc.returncode}): {proc.stderr[-2000:]}')
    return float(json.loads(lines[-1])['peak_mem_mb'])


# -- runs ------------------------------------------------------------------------------------------
def _result(runner: StepRunner, step_s: list[float], first_s: float, matmul_gflops: list[float],
            flops: float | None = None) -> BenchmarkResult:
    cfg = runner.cfg
    per_image = flops if flops is not None else forward_flops(cfg.model, runner.img_size)
    result = BenchmarkResult(
        config=cfg, img_size=runner.img_size, step_ms=[s * 1e3 for s in step_s],
        flops_per_step=per_image * cfg.batch * (3 if cfg.mode == 'train' else 1),
        matmul_gflops=matmul_gflops, first_step_s=first_s)
    if getattr(runner, 'last_loss', None) is not None:
        result.extra['last_loss'] = float(runner.last_loss)
    return result


def _warm(runner: StepRunner) -> float:
    first = runner.timed_step() if runner.cfg.warmup else 0.0
    for _ in range(runner.cfg.warmup - 1):
        runner.step()
    return first


def _alternate(runners: list, steps: int) -> tuple[list[list[float]], list[list[float]]]:
    """Rounds of one timed step of each runner in turn, then a matmul burst in each runner's dtype."""
    times: list[list[float]] = [[] for _ in runners]
    matmul: list[list[float]] = [[] for _ in runners]
    for _ in range(steps):
        for i, runner in enumerate(runners):
            times[i].append(runner.timed_step())
        rates: dict[tuple[str, str], float] = {}
        for i, runner in enumerate(runners):
            key = (matmul_dtype(runner.cfg), runner.cfg.device)
            if key not in rates:
                rates[key] = matmul_peak_gflops(*key, budget_s=0.3)
            matmul[i].append(rates[key])
    return times, matmul


def run_benchmark(cfg: BenchmarkConfig, memory: bool = True) -> BenchmarkResult:
    """Warm up, time ``cfg.steps`` steps (each followed by a matmul burst), measure the step's peak memory."""
    runner = StepRunner(cfg)
    first = _warm(runner)
    (times,), (matmul,) = _alternate([runner], cfg.steps)
    result = _result(runner, times, first, matmul)
    del runner
    if memory:
        result.peak_mem_mb = peak_mem_mb(cfg)
    return result


def run_pair(a: BenchmarkConfig, b: BenchmarkConfig, memory: bool = True) -> tuple[BenchmarkResult, BenchmarkResult]:
    """Both configurations in this process, timed in turn step by step (A, B, A, B, ...)."""
    ra, rb = StepRunner(a), StepRunner(b)
    first_a, first_b = _warm(ra), _warm(rb)
    (ta, tb), (ma, mb) = _alternate([ra, rb], max(a.steps, b.steps))
    res_a, res_b = _result(ra, ta, first_a, ma), _result(rb, tb, first_b, mb)
    del ra, rb
    if memory:
        res_a.peak_mem_mb, res_b.peak_mem_mb = peak_mem_mb(a), peak_mem_mb(b)
    return res_a, res_b


def speedup(a: BenchmarkResult, b: BenchmarkResult) -> float:
    """How many times faster A ran than B: the median over rounds of B's step time over A's.

    Steps of ``run_pair`` alternate, so each round's two steps saw the same load on the machine.
    """
    return statistics.median(tb / ta for ta, tb in zip(a.step_ms, b.step_ms))


class OnnxRuntimeRunner:
    """The same inference step through an exported file (onnxruntime's CPU session, or OpenVINO's CPU
    runtime with ``fmt='openvino'``), on a copy of ``runner``'s model and batch."""

    def __init__(self, runner: StepRunner, workdir: str, fmt: str = 'onnx'):
        from ..export import FORMATS, export_model, load_exported
        cfg = runner.cfg
        if cfg.mode != 'infer' or cfg.device != 'cpu' or cfg.dtype != 'fp32':
            raise ValueError(f'{fmt} is compared on CPU fp32 inference only')
        self.cfg, self.img_size, self.device = cfg, runner.img_size, runner.device
        path = export_model(runner.model, fmt, os.path.join(workdir, f'{cfg.model}{FORMATS[fmt]}'),
                            img_size=runner.img_size, dynamic_batch=True)
        self.session = load_exported(path, fmt)
        self.x = runner.x

    def step(self):
        self.session(self.x)

    def timed_step(self) -> float:
        t0 = time.perf_counter()
        self.step()
        return time.perf_counter() - t0


def run_onnxruntime_pair(cfg: BenchmarkConfig, fmt: str = 'onnx') -> tuple[BenchmarkResult, BenchmarkResult]:
    """PyTorch eager and the exported file (onnxruntime, or OpenVINO with ``fmt='openvino'``) on the same
    model and batch, timed in turn (CPU, fp32, infer)."""
    import tempfile
    runner = StepRunner(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ort_runner = OnnxRuntimeRunner(runner, tmp, fmt)
        first_t, first_o = _warm(runner), _warm(ort_runner)
        (tt, to), (mt, mo) = _alternate([runner, ort_runner], cfg.steps)
    flops = forward_flops(cfg.model, runner.img_size)
    return _result(runner, tt, first_t, mt, flops), _result(runner, to, first_o, mo, flops)


@torch.no_grad()
def top1_agreement(model: torch.nn.Module, images: torch.Tensor, dtype: str = 'bf16', batch: int = 32,
                   device: str = 'cpu', cast_weights: bool = False) -> tuple[float, float]:
    """Fraction of ``images`` whose top-1 class under ``dtype`` autocast (``cast_weights``: with the weights
    cast once; ``int8``: quantized) equals the float32 one, and the fraction whose low-precision top-1 is
    among the float32 top-5."""
    model = model.eval().to(device)
    precision = InferencePrecision(dtype, cast_weights)
    low_model = precision.prepare(model, device)
    agree = in_top5 = 0
    for chunk in images.split(batch):
        chunk = chunk.to(device)
        ref = model(chunk).float()
        low = precision.logits(low_model, chunk)
        top1 = low.argmax(dim=-1)
        agree += int((top1 == ref.argmax(dim=-1)).sum())
        in_top5 += int((ref.topk(5, dim=-1).indices == top1[:, None]).any(dim=-1).sum())
    return agree / len(images), in_top5 / len(images)


# Published ImageNet top-1 (%, 224 px) of timm models users compare against; timm's pretrained configs
# carry no accuracy. vit_small_patch16_224 is DeiT-S (Touvron et al., ICML 2021, Table 1: 79.9);
# resnet50 as in the T2T-ViT paper's Table 3 (torchvision's weights: 76.1); the rest from the same papers.
KNOWN_TOP1 = {
    'vit_small_patch16_224': 79.9,
    'deit_small_patch16_224': 79.9,
    'deit_tiny_patch16_224': 72.2,
    'deit_base_patch16_224': 81.8,
    'resnet50': 76.1,
    'resnet101': 77.4,
    'resnet152': 78.3,
}


def _timm_model(name: str, img_size: int) -> torch.nn.Module:
    import timm
    if not timm.is_model(name):
        raise UserError(f'--compare {name}: timm has no model of that name (see timm.list_models())')
    try:  # transformers fix their position table to one size; convolutional networks take any
        return timm.create_model(name, pretrained=False, img_size=img_size)
    except TypeError:
        return timm.create_model(name, pretrained=False)


def run_compare(cfg: BenchmarkConfig, others: list[str]) -> list[tuple[str, float | None, BenchmarkResult]]:
    """``cfg``'s model and the timm models ``others`` (random weights) timed in turn step by step.

    Rows: (name, published top-1 or None, result); the results' FLOPs are ours for our model and
    0 for the others (their MACs are not counted here).
    """
    from ..models import PAPER_RESULTS
    runners = [StepRunner(cfg)]
    for name in others:
        model = _timm_model(name, runners[0].img_size)
        runners.append(StepRunner(dataclasses.replace(cfg, model=name, img_size=runners[0].img_size), model=model))
    firsts = [_warm(r) for r in runners]
    times, matmul = _alternate(runners, cfg.steps)
    rows = []
    for i, runner in enumerate(runners):
        flops = None if i == 0 else 0.0
        top1 = PAPER_RESULTS.get(cfg.model, (None,))[0] if i == 0 else KNOWN_TOP1.get(runner.cfg.model)
        rows.append((runner.cfg.model, top1, _result(runner, times[i], firsts[i], matmul[i], flops)))
    return rows


def format_compare(rows: list[tuple[str, float | None, BenchmarkResult]]) -> str:
    base = rows[0][2]
    c = base.config
    lines = [f'{c.mode} batch {c.batch} {base.img_size}px {c.dtype} on {c.device}, alternating step by step',
             f"{'model':<28} {'img/s':>8} {'ms/step':>9} {'vs ' + rows[0][0]:>22} {'top-1 (published)':>18}"]
    for name, top1, r in rows:
        lines.append(f"{name:<28} {r.img_per_s:>8.2f} {r.ms_per_step:>9.1f} {speedup(r, base):>21.2f}x "
                     f"{'-' if top1 is None else f'{top1:.1f}':>18}")
    return '\n'.join(lines)


STAGES = ('stem', 'blocks', 'head')


def stage_times(runner: StepRunner) -> dict[str, float]:
    """Seconds of one forward pass in each stage: the T2T stem with class token and positions, the
    Transformer blocks, the final norm and the head (inference, the step's dtype)."""
    model, x = runner.model, runner.x
    out: dict[str, float] = {}
    with torch.inference_mode(), runner.precision.autocast(runner.device):
        _sync(runner.device)
        t0 = time.perf_counter()
        tokens = model._tokens(x)[0]
        _sync(runner.device)
        t1 = time.perf_counter()
        for blk in model.blocks:
            tokens = blk(tokens)
        _sync(runner.device)
        t2 = time.perf_counter()
        model.forward_head(model.norm(tokens))
        _sync(runner.device)
        t3 = time.perf_counter()
    out.update(stem=t1 - t0, blocks=t2 - t1, head=t3 - t2)
    return out


def run_breakdown(cfg: BenchmarkConfig) -> dict[str, float]:
    """Median seconds of each stage over ``cfg.steps`` forward passes after the warm-up."""
    runner = StepRunner(dataclasses.replace(cfg, mode='infer'))
    for _ in range(max(1, cfg.warmup)):
        stage_times(runner)
    samples = [stage_times(runner) for _ in range(cfg.steps)]
    return {stage: statistics.median(s[stage] for s in samples) for stage in STAGES}


def format_breakdown(cfg: BenchmarkConfig, times: dict[str, float]) -> str:
    total = sum(times.values())
    lines = [f'{cfg.model} forward, batch {cfg.batch}, {cfg.dtype}, attn={cfg.attn}: {total * 1e3:.1f} ms, '
             f'{cfg.batch / total:.2f} img/s (median of {cfg.steps} per stage)']
    names = {'stem': 'T2T stem (soft splits, T2T layers, positions)', 'blocks': 'Transformer blocks',
             'head': 'final norm and head'}
    for stage in STAGES:
        lines.append(f'  {names[stage]:<46} {times[stage] * 1e3:9.1f} ms  {times[stage] / total:6.1%}')
    return '\n'.join(lines)


def format_result(r: BenchmarkResult) -> str:
    c = r.config
    mem = 'n/a' if r.peak_mem_mb is None else f'{r.peak_mem_mb:.0f} MB'
    options = (' compiled' if c.compile else '') + (' weights cast once' if c.cast_weights else '') + (
        ' ' + ' '.join(w for w, on in (('fused', c.fused_stem), ('compiled', c.compile_stem)) if on) + ' stem'
        if c.fused_stem or c.compile_stem else '') + (
        ' grad-checkpointing' if c.grad_checkpointing else '') + (
        f" activations={'lean' if c.lean else 'plain'}" if c.mode == 'train' else '')
    fraction = r.peak_fraction
    lines = [
        f'{c.model} {c.mode} batch {c.batch} {r.img_size}px {c.dtype} attn={c.attn}{options} on {c.device}',
        f'  {r.img_per_s:.2f} img/s  {r.ms_per_step:.1f} ms/step (median of {len(r.step_ms)})  peak memory {mem}',
        (f'  {r.gflops_per_s:.1f} GFLOP/s, {fraction:.0%} of the {matmul_dtype(c)} matmul rate measured between steps '
        f'(peak {r.matmul_peak_gflops:.1f} GFLOP/s)'),
    ]
    if c.compile or c.compile_stem:
        lines.append(f'  compile: {r.compile_s:.1f} s (first step {r.first_step_s:.1f} s)')
    return '\n'.join(lines)


def _peak_mem_main(config_json: str) -> int:
    fields_ = {f.name for f in fields(BenchmarkConfig)}
    cfg = BenchmarkConfig(**{k: v for k, v in json.loads(config_json).items() if k in fields_})
    runner = StepRunner(cfg)
    runner.step()  # lazy state (optimizer moments, kernels, compiled code) is not the step's
    print(json.dumps({'peak_mem_mb': step_peak_mem_mb(runner)}), flush=True)
    return 0


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--peak-mem':
        sys.exit(_peak_mem_main(sys.argv[2]))
    sys.exit('usage: python -m t2tvit.analysis.benchmark --peak-mem CONFIG_JSON (use `t2tvit benchmark`)')
