"""The model table: one row per registered model (``t2tvit models``), and its markdown for the README; the same
for the pretrained tags."""
from typing import Any

from torch import nn

from ..factory import list_models
from ..models import Block
from .profile import build, measure

COLUMNS = ('model', 'T2T', 'depth', 'width', 'params (M)', 'MACs (G)',
           'paper top-1 (%)', 'paper params (M)', 'paper MACs (G)')


def describe(model: nn.Module) -> dict[str, Any]:
    """How the model makes tokens and the size of its backbone."""
    stem = getattr(model, 'tokens_to_token', None)
    if stem is not None:
        t2t = stem.token_mixer
    else:
        t2t = f'none ({model.patch_size}x{model.patch_size} patches)'
    depth = sum(isinstance(blk, Block) for blk in model.blocks)
    width = model.embed_dim if model.embed_dim == model.num_features else f'{model.embed_dim}-{model.num_features}'
    return {'t2t': t2t, 'depth': depth, 'width': width}


def model_rows(pattern: str = '', counts: bool = True) -> list[dict[str, Any]]:
    """Every registered model matching ``pattern``; with ``counts``, its structure, params and MACs at its
    configured size (built on the meta device, ~0.2 s a model) and the paper's numbers where published."""
    rows: list[dict[str, Any]] = []
    for name in list_models(pattern):
        row: dict[str, Any] = {'model': name}
        if counts:
            model = build(name)
            p = measure(name, model)
            top1, paper_params, paper_macs = p.paper or (None, None, None)
            row.update(describe(model), img_size=p.img_size, params=p.params, macs=p.macs,
                       paper_top1=top1, paper_params_m=paper_params, paper_macs_g=paper_macs)
        rows.append(row)
    return rows


def _cell(value: Any | None, scale: float = 1.0) -> str:
    if value is None:
        return '-'
    if scale != 1.0:
        return f'{value / scale:.2f}'
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's model table from :func:`model_rows` (with counts)."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        size = '' if r['img_size'] == 224 else f" ({r['img_size']}px)"
        cells = [f"`{r['model']}`{size}", r['t2t'], _cell(r['depth']), _cell(r['width']),
                 _cell(r['params'], 1e6), _cell(r['macs'], 1e9),
                 _cell(r['paper_top1']), _cell(r['paper_params_m']), _cell(r['paper_macs_g'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def pretrained_markdown(rows: list[dict[str, Any]]) -> str:
    """The README's table of pretrained tags from :func:`t2tvit.factory.pretrained_tags`."""
    lines = ['| tag | release file | top-1 (%) | on | classes | px |', '|---|---|---:|---|---:|---:|']
    lines += [f"| `{r['tag']}` | `{r['file']}` | {r['top1']} | {r['dataset']} | {r['num_classes']} | {r['img_size']} |"
              for r in rows]
    return '\n'.join(lines)
