"""What a run leaves beside its checkpoints: config.yaml, metrics.csv, curves.png, TensorBoard events.

Only rank 0 writes. ``metrics.csv`` has one row per epoch; a resumed run first drops the rows of
epochs its checkpoint had not completed, so the file always matches ``last.pth``.
"""

import csv
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

COLUMNS = [
    'epoch',
    'lr',
    'train_loss',
    'val_loss',
    'top1',
    'top5',
    'img_per_s',
    'time',
    'ema_val_loss',
    'ema_top1',
    'ema_top5',
    'kept',  # 'model' or 'ema': the better of the two on validation, the one the epoch's checkpoints serve
]
TEXT_COLUMNS = ('kept',)
RUN_FILES = ('config.yaml', 'last.pth', 'best.pth', 'metrics.csv', 'curves.png')


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(out: Path, config: Dict[str, Any]) -> None:
    _atomic_write_text(out / 'config.yaml', yaml.safe_dump(config, sort_keys=False, default_flow_style=None))


def read_metrics(out: Path) -> List[Dict[str, str]]:
    path = out / 'metrics.csv'
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


class Records:
    """metrics.csv rows, curves.png after every row, TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out: Path, enabled: bool, completed_epochs: int = 0):
        self.out = out
        self.enabled = enabled
        self.rows: List[Dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        logged = read_metrics(out)
        self.rows = [r for r in logged if int(r['epoch']) <= completed_epochs]
        self._rewrite()
        if importlib.util.find_spec('tensorboard') is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge only when epochs past the checkpoint were logged (a run that stopped on non-finite
            # losses): a plain resume has nothing to take back
            stale = len(self.rows) < len(logged)
            self.tb = SummaryWriter(log_dir=str(out / 'tensorboard'),
                                    purge_step=completed_epochs + 1 if stale else None)

    def _rewrite(self) -> None:
        tmp = self.out / '.metrics.csv.tmp'
        with open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, '') for k in COLUMNS})
        os.replace(tmp, self.out / 'metrics.csv')

    def add(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: ('' if row.get(k) is None else _fmt(row.get(k))) for k in COLUMNS}
        self.rows.append(row)
        self._rewrite()
        if self.tb is not None:
            epoch = int(row['epoch'])
            for k in COLUMNS[1:]:
                if row[k] != '' and k not in TEXT_COLUMNS:
                    self.tb.add_scalar(k, float(row[k]), epoch)
            self.tb.flush()
        plot_curves(self.rows, self.out / 'curves.png')

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    if isinstance(v, float):
        return f'{v:.6g}'
    return v


def plot_curves(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Loss, top-1 and lr against epoch (matplotlib's Agg canvas, no display needed)."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def col(name):
        return [float(r[name]) if r.get(name) not in ('', None) else math.nan for r in rows]

    epochs = [int(r['epoch']) for r in rows]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_top1, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, col('train_loss'), 'o-', ms=3, label='train')
    ax_loss.plot(epochs, col('val_loss'), 'o-', ms=3, label='val')
    if any(not math.isnan(v) for v in col('ema_val_loss')):
        ax_loss.plot(epochs, col('ema_val_loss'), 'o--', ms=3, label='val (EMA)')
    ax_loss.set_title('loss')
    ax_loss.legend()
    ax_top1.plot(epochs, col('top1'), 'o-', ms=3, label='model')
    if any(not math.isnan(v) for v in col('ema_top1')):
        ax_top1.plot(epochs, col('ema_top1'), 'o--', ms=3, label='EMA')
        ax_top1.legend()
    ax_top1.set_title('val top-1 (%)')
    ax_lr.plot(epochs, col('lr'), 'o-', ms=3)
    ax_lr.set_title('learning rate')
    ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
    for ax in (ax_loss, ax_top1, ax_lr):
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f'.{path.stem}.tmp.png')
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path
