"""t2tvit's fast paths against the reference math, measured side by side: a markdown table of ratios.

Each comparison builds its two settings in one process and times them step by step in turn
(A, B, A, B, ...), so that drift and other load on a shared machine land on both; a speed
ratio is the median over rounds of the two step times' ratio. Peak memory comes from a fresh
process per setting on CPU (growth of the peak RSS over one step), from
``torch.cuda.max_memory_allocated`` on a GPU. See ``t2tvit.analysis.benchmark``.

    python benchmarks/compare.py                       # the CPU table: about 10 minutes on 2 cores
    python benchmarks/compare.py --quick               # batch 2, 2 steps: a smoke run of every row
    python benchmarks/compare.py --steps 8 --full      # steadier medians, training compile, 384 speed
    python benchmarks/compare.py --device cuda         # the GPU table (batch 128, bf16)
    python benchmarks/compare.py --only attn_infer,bf16 -o benchmarks/RESULTS.md

The bf16 agreement uses the weights of the reference-layout fixtures (``../shared/fixtures``,
deterministic stand-ins for the released checkpoints) when they are there, or a trained
checkpoint given with ``--checkpoint``; random initialisation otherwise.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'src'))

import t2tvit  # noqa: E402  (from src/ above, so the script runs from a checkout)
import t2tvit.runtime  # noqa: E402
from t2tvit.analysis.benchmark import (  # noqa: E402
    BenchmarkConfig,
    BenchmarkResult,
    matmul_dtype,
    run_compare,
    run_onnxruntime_pair,
    run_pair,
    speedup,
    top1_agreement,
)

FIXTURES = ROOT.parent / 'shared' / 'fixtures'


@dataclass
class Row:
    comparison: str
    measure: str
    a: str
    b: str
    ratio: str
    target: str = ''
    met: str = ''


@dataclass
class Options:
    device: str
    steps: int
    warmup: int
    batch_scale: float
    full: bool
    images: int
    checkpoint: str | None


def _batch(opts: Options, batch: int) -> int:
    return max(1, round(batch * opts.batch_scale))


def _met(value: float, target: float, higher: bool) -> str:
    return 'yes' if (value >= target if higher else value <= target) else 'no'


def _img_s(r: BenchmarkResult) -> str:
    return f'{r.img_per_s:.2f} img/s'


def _mem(r: BenchmarkResult) -> str:
    return f'{r.peak_mem_mb:.0f} MB'


def _setting(cfg: BenchmarkConfig, size: int) -> str:
    return f'{cfg.model} {cfg.mode} {size}px b{cfg.batch} {cfg.dtype}'


def _pair_rows(name: str, a: BenchmarkConfig, b: BenchmarkConfig, la: str, lb: str, speed_target: float | None,
               mem_target: float | None, memory: bool = True, note: str = '', loss_rows: bool = False,
               bound: bool = False) -> tuple[list[Row], BenchmarkResult, BenchmarkResult]:
    ra, rb = run_pair(a, b, memory=memory)
    what = f'{name}: {_setting(a, ra.img_size)}'
    ratio = speedup(ra, rb)
    rows = [Row(what, 'img/s', f'{la} {_img_s(ra)}', f'{lb} {_img_s(rb)}', f'{ratio:.2f}x faster',
                f'>= {speed_target}x' if speed_target else note,
                _met(ratio, speed_target, True) if speed_target else '')]
    if bound and speed_target:
        rows.append(_bound_row(what, ra, rb, la, lb, speed_target))
    if memory:
        mem = ra.peak_mem_mb / rb.peak_mem_mb
        rows.append(Row(what, 'peak memory of a step', f'{la} {_mem(ra)}', f'{lb} {_mem(rb)}', f'{mem:.2f}x',
                        f'<= {mem_target}x' if mem_target else note,
                        _met(mem, mem_target, False) if mem_target else ''))
    for r, label in ((ra, la), (rb, lb)) if loss_rows else ():
        if 'last_loss' in r.extra:
            loss = r.extra['last_loss']
            rows.append(Row(what, 'training loss finite', f'{label} loss {loss:.4f}', '', '', 'finite',
                            'yes' if torch.isfinite(torch.tensor(loss)) else 'no'))
    return rows, ra, rb


def _bound_row(what: str, ours: BenchmarkResult, ref: BenchmarkResult, la: str, lb: str, target: float) -> Row:
    """What a speed target over the reference path asks of this machine. Both sides do the same FLOPs (the
    model's MACs), so reaching ``target`` means running at ``target`` times the reference's share of the
    matmul rate measured between the steps: above 100% no implementation can reach it here, and near it only
    one whose every operation, softmax and LayerNorm included, ran at matmul speed."""
    need = round(100 * target * ref.peak_fraction)  # the verdict follows the printed percentage
    return Row(what, f'share of the {matmul_dtype(ref.config)} matmul rate (same FLOPs both sides)',
               f'{la} {ours.peak_fraction:.0%}', f'{lb} {ref.peak_fraction:.0%}', f'{target}x needs {need}%',
               'bound', 'out of reach' if need > 100 else 'reachable')


def _base(opts: Options, model: str, mode: str, batch: int, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(model=model, mode=mode, batch=_batch(opts, batch), device=opts.device, steps=opts.steps,
                           warmup=opts.warmup, **kw)


# -- CPU sections -------------------------------------------------------------------------------
def attn_train(opts: Options) -> list[Row]:
    # sdpa with lean saving (the default) against naive with autograd's plain saving: the reference math
    a = _base(opts, 't2t_vit_t_14', 'train', 16)
    naive = replace(a, attn='naive')
    rows = _pair_rows('sdpa vs naive attention', a, naive, 'sdpa', 'naive', 1.5, 0.4, bound=True)[0]
    # the attention kernel alone: the blocks' kept LayerNorm and GELU outputs are the same for both
    plain = replace(a, activations='plain')
    return rows + _pair_rows('sdpa with plain activation saving vs naive attention', plain, naive, 'sdpa+plain',
                             'naive', None, None, note='report')[0]


def attn_train_384(opts: Options) -> list[Row]:
    a = _base(opts, 't2t_vit_t_14', 'train', 8, img_size=384)
    if not opts.full:  # memory is the target here; two steps of each still give a speed figure
        a = replace(a, steps=min(a.steps, 2), warmup=min(a.warmup, 1))
    return _pair_rows('sdpa vs naive attention', a, replace(a, attn='naive'), 'sdpa', 'naive', None, 0.25)[0]


def attn_infer(opts: Options) -> list[Row]:
    a = _base(opts, 't2t_vit_t_14', 'infer', 32)
    # how close each runs to the machine's matmul rate bounds what any attention kernel can gain
    return _pair_rows('sdpa vs naive attention', a, replace(a, attn='naive'), 'sdpa', 'naive', 1.8, None,
                      bound=True)[0]


def bf16(opts: Options) -> list[Row]:
    low = 'bf16'
    a = _base(opts, 't2t_vit_14', 'infer', 32, dtype=low)
    rows, ra, rb = _pair_rows(f'{low} autocast vs fp32', a, replace(a, dtype='fp32'), low, 'fp32', 1.6, None)
    for r in (rb, ra):
        frac = r.peak_fraction
        target = r.config.dtype == 'fp32'
        rows.append(Row(f'model vs matmul peak: {_setting(r.config, r.img_size)}',
                        'GFLOP/s (matmul bursts between the steps)', f'model {r.gflops_per_s:.1f}',
                        f'{r.config.dtype} matmul {statistics.median(r.matmul_gflops):.1f}', f'{frac:.0%} of peak',
                        '>= 85%' if target else '', _met(frac, 0.85, True) if target else ''))
    t = _base(opts, 't2t_vit_14', 'train', 16, dtype=low)
    rows += _pair_rows(f'{low} autocast vs fp32', t, replace(t, dtype='fp32'), low, 'fp32', None, None,
                       loss_rows=True)[0]
    return rows


def _fixture_module():
    spec = importlib.util.spec_from_file_location('official_ckpt', FIXTURES / 'official_ckpt.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fixture_model(name: str):
    """``name`` with the fixtures' reference-layout weights, or None without fixtures."""
    if not (FIXTURES / f'{name}.spec.json').is_file():
        return None
    oc = _fixture_module()
    spec = json.loads((FIXTURES / f'{name}.spec.json').read_text())
    model = t2tvit.create_model(name, img_size=spec.get('img_size', 224)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in oc.make_state_dict(spec).items()}, strict=True)
    return model


def _digits(count: int, size: int) -> torch.Tensor:
    """scikit-learn's handwritten digits as normalised RGB images of ``size`` pixels."""
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    images = torch.from_numpy(load_digits().images[:count]).float()[:, None] / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode='bilinear', align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[None, :, None, None]
    return (images - mean) / std


def bf16_agreement(opts: Options) -> list[Row]:
    rows = []
    if opts.checkpoint:
        model, weights = t2tvit.create_model(None, checkpoint_path=opts.checkpoint).eval(), opts.checkpoint
    else:
        model = _fixture_model('t2t_vit_14')
        weights = 'fixture weights' if model is not None else 'random init (no fixtures)'
        model = model if model is not None else t2tvit.create_model('t2t_vit_14').eval()
    name = getattr(model, 't2tvit_config', {}).get('model', 't2t_vit_14')
    images = _digits(opts.images, model.img_size[0])
    top1, top5 = top1_agreement(model, images, 'bf16', device=opts.device)
    rows.append(Row(f'bf16 vs fp32 top-1: {name} ({weights}), {len(images)} digits at {model.img_size[0]}px',
                    'same top-1', f'{top1:.1%}', f'bf16 top-1 in fp32 top-5: {top5:.1%}', '', '>= 99%',
                    _met(top1, 0.99, True)))
    if FIXTURES.is_dir():
        oc = _fixture_module()
        for fixture in ('t2t_vit_7', 't2t_vit_t_14'):
            expected = json.loads((FIXTURES / f'{fixture}.expected.json').read_text())
            x = torch.from_numpy(oc.make_inputs(expected['input']['batch'], expected['input']['size']))
            net = _fixture_model(fixture).to(opts.device)
            with torch.no_grad(), torch.autocast(opts.device, dtype=torch.bfloat16):
                top = net(x.to(opts.device)).float().argmax(dim=-1).tolist()
            ref = [t[0] for t in expected['top5']]
            same = sum(int(p == r) for p, r in zip(top, ref))
            rows.append(Row(f"bf16 vs the reference's fp32 top-1: {fixture} fixture inputs", 'same top-1',
                            f'{same}/{len(ref)}', f'reference top-1 {ref}', '', 'all',
                            'yes' if same == len(ref) else 'no'))
    return rows


def _vs_timm(name: str, cfg: BenchmarkConfig, other: str, label: str, target: float | None,
             latency: bool = False) -> list[Row]:
    """Our model and a timm model (random weights) timed in turn; the ratio is ours over theirs."""
    (_, _, ours), (_, top1, theirs) = run_compare(cfg, [other])
    what = f'{name}: {_setting(cfg, ours.img_size)}' + (' (weights cast once)' if cfg.cast_weights else '')
    if latency:  # how many times the other's latency ours takes
        ratio = 1 / speedup(ours, theirs)
        return [Row(what, 'latency (ms per image)', f'{cfg.model} {ours.ms_per_step:.1f} ms',
                    f'{label} {theirs.ms_per_step:.1f} ms', f'{ratio:.2f}x the latency',
                    f'<= {target}x' if target else 'report', _met(ratio, target, False) if target else '')]
    ratio = speedup(ours, theirs)
    return [Row(what, 'img/s', f'{cfg.model} {_img_s(ours)}', f'{label} ({top1}% top-1) {_img_s(theirs)}',
                f'{ratio:.2f}x faster', f'>= {target}x' if target else 'report',
                _met(ratio, target, True) if target else '')]


def fast_stem(opts: Options, batch: int = 32, train_batch: int = 16) -> list[Row]:
    # the fused soft splits against the reference path (unfold, LayerNorm and Linear over patch matrices)
    a = _base(opts, 't2t_vit_14', 'infer', batch, fused_stem=True)
    naive = replace(a, attn='naive', fused_stem=False)
    rows = _pair_rows('fused stem vs reference path', a, naive, 'fused', 'naive', 1.25, None, memory=False,
                      bound=True)[0]
    t14 = replace(a, model='t2t_vit_t_14')
    rows += _pair_rows('fused stem vs reference path', t14, replace(t14, attn='naive', fused_stem=False), 'fused',
                       'naive', 1.8, None, memory=False, bound=True)[0]
    low = replace(a, dtype='bf16', cast_weights=True)
    rows += _pair_rows('bf16 weights cast once vs the reference path under bf16 autocast', low,
                       replace(naive, dtype='bf16'), 'bf16 cast', 'naive bf16', 1.5, None, memory=False,
                       bound=True)[0]
    rows += _vs_timm('bf16 vs DeiT-S', low, 'vit_small_patch16_224', 'DeiT-S', 0.85)
    rows += _vs_timm('fp32 vs DeiT-S', a, 'vit_small_patch16_224', 'DeiT-S', None)
    t = _base(opts, 't2t_vit_14', 'train', train_batch, dtype='bf16')
    # training keeps the unfold stem (layers/t2t.py): sdpa and lean saving against the reference path
    rows += _pair_rows('bf16 training vs reference path', t, replace(t, attn='naive'), 'sdpa',
                       'naive', 1.3, None, memory=False, loss_rows=True, bound=True)[0]
    return rows


def _compiled_rows(opts: Options, flags: dict, fp32_name: str, bf16_name: str, label: str, batch: int = 32):
    """A compiled setting (``flags``, with the fused stem) against the reference path: t2t_vit_14 in fp32 with
    the compile time, t2t_vit_t_14, and bf16 with the weights cast once against the reference under autocast.
    Returns the rows and the bf16 setting."""
    a = _base(opts, 't2t_vit_14', 'infer', batch, fused_stem=True, **flags)
    naive = replace(a, attn='naive', fused_stem=False, **{k: False for k in flags})
    rows, ra, _ = _pair_rows(fp32_name, a, naive, label, 'naive', 1.25, None, memory=False, bound=True)
    rows.append(Row(rows[0].comparison, 'compile time (first call)', f'{ra.compile_s:.0f} s', '', '', 'report', ''))
    rows += _pair_rows(fp32_name, replace(a, model='t2t_vit_t_14'), replace(naive, model='t2t_vit_t_14'), label,
                       'naive', 1.8, None, memory=False, bound=True)[0]
    low = replace(a, dtype='bf16', cast_weights=True)
    rows += _pair_rows(bf16_name, low, replace(naive, dtype='bf16'), f'bf16 cast {label}', 'naive bf16', 1.5, None,
                       memory=False, bound=True)[0]
    return rows, low


def compiled_stem(opts: Options) -> list[Row]:
    # the stem through torch.compile (set_compiled_stem), the blocks eager, against the same reference paths and
    # DeiT-S as fast_stem's eager rows: the fused stem in inference, the unfold one in training
    rows, low = _compiled_rows(opts, {'compile_stem': True}, 'compiled fused stem vs reference path',
                               'bf16 weights cast once, compiled stem, vs the reference path under bf16 autocast',
                               'compiled stem')
    rows += _vs_timm('bf16 compiled stem vs DeiT-S (eager)', low, 'vit_small_patch16_224', 'DeiT-S', 0.85)
    rows += _pair_rows('compiled vs eager fused stem', low, replace(low, compile_stem=False), 'compiled',
                       'eager', None, None, memory=False, note='report')[0]
    t = _base(opts, 't2t_vit_14', 'train', 16, dtype='bf16', compile_stem=True)
    rows += _pair_rows('bf16 training, compiled stem, vs reference path', t,
                       replace(t, attn='naive', compile_stem=False), 'sdpa compiled stem', 'naive', 1.3, None,
                       memory=False, loss_rows=True, bound=True)[0]
    return rows


def frozen(opts: Options, batch: int = 32) -> list[Row]:
    # the whole model through torch.compile with inductor's freezing (benchmark --compile in inference, as
    # predict/validate/serve --compile run it): the weights become constants and the matmuls oneDNN's prepacked ones
    rows, low = _compiled_rows(opts, {'compile': True}, 'fused stem, compiled (frozen), vs reference path',
                               'bf16 weights cast once, fused stem, compiled (frozen), vs the reference path under '
                               'bf16 autocast', 'frozen', batch)
    rows += _vs_timm('bf16 compiled (frozen) vs DeiT-S compiled (frozen)', low, 'vit_small_patch16_224', 'DeiT-S',
                     0.85)
    rows += _pair_rows('compiled (frozen) vs compiled stem', low, replace(low, compile=False, compile_stem=True),
                       'frozen', 'compiled stem', None, None, memory=False, note='report')[0]
    rows += _vs_timm('batch 1 latency, compiled (frozen) both, vs DeiT-S', replace(low, batch=1),
                     'vit_small_patch16_224', 'DeiT-S', 1.3, latency=True)
    return rows


def _cli_step_ms(flags: list[str], keep: bool) -> float:
    """Median ms per step of ``t2tvit benchmark FLAGS`` in a fresh process, with or without freed memory kept."""
    import subprocess
    env = dict(os.environ, T2TVIT_KEEP_FREED_MEMORY='1' if keep else '0')
    out = subprocess.run([sys.executable, '-m', 't2tvit', 'benchmark', *flags, '--json', '--no-memory'], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])['ms_per_step'])


def malloc(opts: Options) -> list[Row]:
    # a process-wide setting (t2tvit.runtime), so each round runs both settings in fresh processes, in turn
    rows = []
    settings = (
        ('t2t_vit_14 infer b32 bf16, weights cast once, fused stem', 32,
         ['--model', 't2t_vit_14', '--dtype', 'bf16', '--cast-weights', '--fused-stem']),
        ('t2t_vit_14 infer b32 fp32, reference path', 32, ['--model', 't2t_vit_14', '--attn', 'naive']),
        ('t2t_vit_14 train b16 bf16 autocast', 16, ['--model', 't2t_vit_14', '--mode', 'train', '--dtype', 'bf16']),
    )
    for what, batch, flags in settings:
        flags = flags + ['-b', str(_batch(opts, batch)), '--steps', str(opts.steps), '--warmup', str(opts.warmup),
                         '--device', opts.device]
        kept, plain, ratios = [], [], []
        for r in range(max(opts.steps, 3)):
            order = (True, False) if r % 2 == 0 else (False, True)
            ms = {keep: _cli_step_ms(flags, keep) for keep in order}
            kept.append(ms[True])
            plain.append(ms[False])
            ratios.append(ms[False] / ms[True])
        rows.append(Row(f'freed memory kept vs returned to the kernel (glibc malloc): {what}', 'ms per step',
                        f'kept {statistics.median(kept):.0f} ms', f'returned {statistics.median(plain):.0f} ms',
                        f'{statistics.median(ratios):.2f}x faster', 'report', ''))
    return rows


def batch1(opts: Options) -> list[Row]:
    rows = []
    for low in (False, True):
        cfg = BenchmarkConfig(model='t2t_vit_14', batch=1, device=opts.device, steps=max(opts.steps, 5),
                              warmup=opts.warmup, dtype='bf16' if low else 'fp32', cast_weights=low)
        rows += _vs_timm('batch 1 latency vs DeiT-S', cfg, 'vit_small_patch16_224', 'DeiT-S', 1.3, latency=True)
    return rows


def int8(opts: Options) -> list[Row]:
    a = _base(opts, 't2t_vit_14', 'infer', 32, dtype='int8')
    rows = _pair_rows('int8 (dynamic, blocks and head) vs fp32', a, replace(a, dtype='fp32'), 'int8', 'fp32', 1.5,
                      None, memory=False)[0]
    model = _fixture_model('t2t_vit_14')
    weights = 'fixture weights' if model is not None else 'random init (no fixtures)'
    model = model if model is not None else t2tvit.create_model('t2t_vit_14').eval()
    images = _digits(opts.images, model.img_size[0])
    for dtype, cast in (('int8', False), ('bf16', True)):
        top1, top5 = top1_agreement(model, images, dtype, cast_weights=cast)
        label = 'bf16 weights cast once' if cast else dtype
        rows.append(Row(f'{label} vs fp32 top-1: t2t_vit_14 ({weights}), {len(images)} digits at 224px',
                        'same top-1', f'{top1:.1%}', f'top-1 in fp32 top-5: {top5:.1%}', '', '>= 99%',
                        _met(top1, 0.99, True)))
    return rows


def _compile_rows(a: BenchmarkConfig, note: str) -> list[Row]:
    import torch._inductor.config as inductor_config
    # a cold compile, as a first run sees it: no kernels from earlier runs' cache
    with inductor_config.patch(force_disable_caches=True):
        name = 'torch.compile vs eager' if a.mode == 'train' else 'torch.compile (freezing) vs eager'
        rows, ra, _ = _pair_rows(name, a, replace(a, compile=False), 'compiled', 'eager', None, None, memory=False,
                                 note=note)
    rows.append(Row(rows[0].comparison, 'compile time (first call, cold cache)', f'{ra.compile_s:.0f} s', '', '',
                    'report', ''))
    return rows


def compile_infer(opts: Options) -> list[Row]:
    return _compile_rows(_base(opts, 't2t_vit_14', 'infer', 32, compile=True), 'report')


def compile_train(opts: Options) -> list[Row]:
    return _compile_rows(_base(opts, 't2t_vit_14', 'train', 16, compile=True), 'report')


def onnxruntime(opts: Options) -> list[Row]:
    import onnxruntime as ort
    cfg = _base(opts, 't2t_vit_14', 'infer', 32)
    rt, ro = run_onnxruntime_pair(cfg)
    ratio = speedup(ro, rt)
    return [Row(f'onnxruntime {ort.__version__} vs PyTorch eager: {_setting(cfg, rt.img_size)}', 'img/s',
                f'onnxruntime {_img_s(ro)}', f'PyTorch {_img_s(rt)}', f'{ratio:.2f}x faster', 'report', '')]


def openvino(opts: Options) -> list[Row]:
    import openvino as ov
    cfg = _base(opts, 't2t_vit_14', 'infer', 32)
    rt, ro = run_onnxruntime_pair(cfg, 'openvino')
    ratio = speedup(ro, rt)
    return [Row(f'OpenVINO {ov.__version__.split("-")[0]} (fp32 IR) vs PyTorch eager: {_setting(cfg, rt.img_size)}',
                'img/s', f'OpenVINO {_img_s(ro)}', f'PyTorch {_img_s(rt)}', f'{ratio:.2f}x faster', 'report', '')]


def grad_checkpointing(opts: Options) -> list[Row]:
    a = _base(opts, 't2t_vit_t_14', 'train', 16)
    rows = []
    for name, first, second, la, lb in (
            ('lean vs plain activation saving', a, replace(a, activations='plain'), 'lean', 'plain'),
            ('gradient checkpointing vs lean saving', replace(a, grad_checkpointing=True), a, 'checkpointed', 'lean'),
    ):
        rows += _pair_rows(name, first, second, la, lb, None, None, note='report')[0]
    return rows


# -- GPU sections ----------------------------------------------------------------------------------
def gpu_attn(opts: Options) -> list[Row]:
    rows = []
    for model in ('t2t_vit_14', 't2t_vit_t_14'):
        for mode, target in (('train', 1.5), ('infer', None)):
            a = _base(opts, model, mode, 128, dtype='bf16')
            rows += _pair_rows('sdpa vs naive attention', a, replace(a, attn='naive'), 'sdpa', 'naive', target, None,
                               bound=True)[0]
    return rows


def gpu_compile(opts: Options) -> list[Row]:
    return _compile_rows(_base(opts, 't2t_vit_14', 'train', 128, dtype='bf16', compile=True), 'clear win')


def gpu_low_precision(opts: Options) -> list[Row]:
    # the low-precision issue's rows on CUDA at batch 128: the CPU's eager (fast_stem) and frozen sections, and
    # batch-1 latency
    return fast_stem(opts, batch=128, train_batch=128) + frozen(opts, batch=128) + batch1(opts)


CPU_SECTIONS: dict[str, Callable[[Options], list[Row]]] = {
    'attn_train': attn_train, 'attn_train_384': attn_train_384, 'attn_infer': attn_infer, 'bf16': bf16,
    'bf16_agreement': bf16_agreement, 'compile_infer': compile_infer, 'compile_train': compile_train,
    'onnxruntime': onnxruntime, 'grad_checkpointing': grad_checkpointing, 'fast_stem': fast_stem,
    'compiled_stem': compiled_stem, 'frozen': frozen, 'malloc': malloc, 'batch1': batch1,
    'int8': int8, 'openvino': openvino,
}
FULL_ONLY = {'compile_train'}
GPU_SECTIONS: dict[str, Callable[[Options], list[Row]]] = {
    'gpu_attn': gpu_attn, 'bf16_agreement': bf16_agreement, 'gpu_compile': gpu_compile,
    'gpu_low_precision': gpu_low_precision,
}


# the CPU features that decide which low-precision kernels run (bf16 / int8 dot products, AMX tiles)
CPU_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx_vnni', 'amx_tile', 'amx_bf16', 'amx_int8')


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if 'model name' in info:
        cpu = f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    text = f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'
    if 'flags' in info:
        have = set(info['flags'].split())
        missing = ', '.join(f for f in CPU_FLAGS if f not in have) or '-'
        text += f"; CPU flags: {' '.join(f for f in CPU_FLAGS if f in have)} (no {missing})"
    if device == 'cuda':
        text = f'{torch.cuda.get_device_name()} ({text})'
    return text


def _load() -> str:
    try:
        return f'{os.getloadavg()[0]:.1f}'
    except OSError:
        return 'n/a'


def markdown(rows: list[Row], header: list[str]) -> str:
    cols = ['comparison', 'measure', 'A', 'B', 'A vs B', 'target', 'met']
    lines = [*header, '', f"| {' | '.join(cols)} |", '|' + '---|' * len(cols)]
    for r in rows:
        lines.append(f'| {r.comparison} | {r.measure} | {r.a} | {r.b} | {r.ratio} | {r.target} | {r.met} |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    sections_help = ', '.join(list(CPU_SECTIONS) + [s for s in GPU_SECTIONS if s not in CPU_SECTIONS])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--steps', type=int, default=3, help='timed steps of each setting (default 3)')
    ap.add_argument('--warmup', type=int, default=1, help='untimed steps first (default 1)')
    ap.add_argument('--batch-scale', type=float, default=1.0, help="multiply every comparison's batch size")
    ap.add_argument('--images', type=int, default=256, help='digits for the bf16 agreement (default 256)')
    ap.add_argument('--quick', action='store_true', help='batch scale 1/8, 2 steps, 32 digits: a smoke run')
    ap.add_argument('--full', action='store_true', help='also training compile, and timed steps at 384')
    ap.add_argument('--only', help=f'comma-separated sections: {sections_help}')
    ap.add_argument('--checkpoint', help='a trained checkpoint for the bf16 agreement (e.g. runs/demo/best.pth)')
    ap.add_argument('-o', '--output', help='also write the table to this file')
    ap.add_argument('--readme', help='also put the table into this README, between its bench-table markers')
    args = ap.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        ap.error('--device cuda: torch sees no CUDA device here')
    opts = Options(device=args.device, steps=args.steps, warmup=args.warmup, batch_scale=args.batch_scale,
                   full=args.full, images=args.images, checkpoint=args.checkpoint)
    if args.quick:
        opts = replace(opts, steps=2, warmup=1, batch_scale=args.batch_scale / 8, images=32)
    table = GPU_SECTIONS if args.device == 'cuda' else CPU_SECTIONS
    if args.only:
        names = [n.strip() for n in args.only.split(',') if n.strip()]
        unknown = [n for n in names if n not in table]
        if unknown:
            ap.error(f"unknown section(s) {', '.join(unknown)} for --device {args.device}: {', '.join(table)}")
    else:
        names = [n for n in table if opts.full or n not in FULL_ONLY]
    # as the t2tvit command does (t2tvit.runtime): the in-process rows time what a user of the command gets
    kept = t2tvit.runtime.keep_freed_memory()
    start, load_start = time.perf_counter(), _load()
    rows: list[Row] = []
    for name in names:
        t0 = time.perf_counter()
        rows += table[name](opts)
        print(f'[{name}: {time.perf_counter() - t0:.0f} s]', file=sys.stderr, flush=True)
    try:
        import onnxruntime
        ort_version = f', onnxruntime {onnxruntime.__version__}'
    except ImportError:
        ort_version = ''
    command = ' '.join(['python benchmarks/compare.py'] + (sys.argv[1:] if argv is None else argv))
    now = datetime.datetime.now(datetime.timezone.utc)
    header = [
        f'Machine: {machine(args.device)}.',
        (f'torch {torch.__version__}, timm {timm.__version__}{ort_version}; {now:%Y-%m-%d %H:%M} UTC; '
        f'`{command}` ran {time.perf_counter() - start:.0f} s.'),
        (f'Each setting: {opts.warmup} warm-up + {opts.steps} timed steps, alternating A/B; batch sizes '
        f'scaled by {opts.batch_scale:g}. Speed ratios are medians of per-round step-time ratios.'),
        f'Load average (1 min) at the start and the end: {load_start} and {_load()} (other work on the machine).',
        ('glibc malloc keeps freed memory in this process, as the t2tvit command sets it (t2tvit.runtime): '
         f"{'yes' if kept else 'no'}."),
        '',
        ('Peak memory of a step: what one step needs above the weights, optimizer state and batch already '
         'resident (CPU: growth of the peak RSS in a fresh process; GPU: of max allocated). GFLOP/s: the '
         "model's MACs (t2tvit profile) x 2 x batch (x 3 for a training step) over the median step time. "
         'Training steps are forward, cross entropy, backward and AdamW; inference runs under inference_mode; '
         'bf16 is autocast over float32 weights.'),
    ]
    text = markdown(rows, header)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.readme:
        put_in_readme(Path(args.readme), text)
    return 0


MARKERS = ('<!-- bench-table:start -->', '<!-- bench-table:end -->')


def put_in_readme(readme: Path, text: str) -> None:
    """Replace what lies between the README's bench-table markers with ``text``."""
    doc = readme.read_text()
    start, end = doc.find(MARKERS[0]), doc.find(MARKERS[1])
    if start < 0 or end < start:
        sys.exit(f'{readme}: no {MARKERS[0]} ... {MARKERS[1]} section to put the table in')
    readme.write_text(doc[:start + len(MARKERS[0])] + '\n' + text + doc[end:])


if __name__ == '__main__':
    sys.exit(main())
