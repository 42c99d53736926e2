"""`t2tvit ablate`: the paper's ablation set at small scale, its verdicts, and the files it writes."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

import t2tvit
from t2tvit.analysis import ablate
from t2tvit.analysis.ablate import EFFECTS, VARIANTS, Ablation, Run, judge, model_kwargs, plan_epochs
from t2tvit.cli import main
from t2tvit.errors import UserError


# -- the model set --------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [32])  # CIFAR's size; the runs below use 16 and 8
def test_every_variant_builds_small_with_a_stride_4_token_grid(size):
    for key, v in VARIANTS.items():
        model = t2tvit.create_model(v['model'], num_classes=10, **model_kwargs(key, size)).eval()
        tokens = model.forward_features(torch.zeros(1, 3, size, size))
        assert tokens.shape[1] == 1 + (size // 4) ** 2, key
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 10)


def test_variants_differ_only_in_what_the_ablation_changes():
    built = {k: t2tvit.create_model(VARIANTS[k]['model'], num_classes=10, **model_kwargs(k, 16)) for k in VARIANTS}
    t2t = built['t2t']
    assert t2t.tokens_to_token.token_mixer == 'performer'
    assert built['conv_t2t'].tokens_to_token.token_mixer == 'convolution'
    assert built['transformer_t2t'].tokens_to_token.token_mixer == 'transformer'
    assert not hasattr(built['wo_t2t'], 'tokens_to_token') and built['wo_t2t'].patch_embed.patch_size == (4, 4)
    for k in ('wo_t2t', 'conv_t2t', 'transformer_t2t'):  # Table 7: the same deep-narrow backbone
        assert (built[k].embed_dim, len(built[k].blocks)) == (t2t.embed_dim, len(t2t.blocks)) == (64, 8)
    wide = built['shallow_wide']  # shallow-wide at about the same parameters
    assert (wide.embed_dim, len(wide.blocks)) == (128, 2)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in built.items()}
    assert abs(n['shallow_wide'] / n['t2t'] - 1) < 0.1


def test_paper_directions_come_from_the_published_numbers():
    paper = {e.b: e.paper_difference() for e in EFFECTS}
    assert paper == {'wo_t2t': 2.0, 'conv_t2t': 0.7, 'shallow_wide': 2.7, 'transformer_t2t': -0.2}


# -- verdicts and planning ------------------------------------------------------------------------
T2T_VS_PATCHES, _, _, PERFORMER_VS_TRANSFORMER = EFFECTS


@pytest.mark.parametrize('a, b, verdict', [
    ([90, 91, 92], [80, 81, 82], 'reproduced'),
    ([90, 85, 95], [88, 83, 93], 'same direction, within seed noise'),
    ([80, 81, 82], [90, 91, 92], 'reversed'),
    ([88, 83, 93], [90, 85, 95], 'opposite direction, within seed noise'),
    ([90], [80], 'same direction (one seed: no spread to test against)'),
])
def test_an_effect_is_reproduced_only_beyond_twice_its_standard_error(a, b, verdict):
    v = judge(T2T_VS_PATCHES, a, b)
    assert v.verdict == verdict
    assert v.diff == pytest.approx(np.mean(a) - np.mean(b))


def test_about_as_good_needs_a_small_difference_measured_precisely():
    assert judge(PERFORMER_VS_TRANSFORMER, [90.0, 90.2, 89.8], [90.8, 91.0, 90.6]).verdict.startswith('reproduced')
    assert judge(PERFORMER_VS_TRANSFORMER, [90.0, 90.2, 89.8], [93.0, 93.2, 92.8]).verdict.startswith('not')
    noisy = judge(PERFORMER_VS_TRANSFORMER, [80.0, 90.0, 100.0], [81.0, 91.0, 101.0])
    assert noisy.verdict.startswith('too noisy to tell')


def test_the_budget_sets_the_epochs_of_every_run():
    assert plan_epochs(30, None, [1.0, 2.0], seeds=3) == (30, '')
    assert plan_epochs(30, 10, [1.0, 2.0], seeds=3, run_overhead=0) == (30, '')  # 9 s an epoch, 600 s
    epochs, note = plan_epochs(30, 1, [1.0, 2.0], seeds=3, run_overhead=0)  # 60 s / 9 s
    assert epochs == 6 and 'fits 6 of the 30' in note
    assert plan_epochs(30, 1, [1.0, 2.0], seeds=3, jobs=2, run_overhead=0)[0] == 12  # (60 - 5 s start) / 4.5 s
    assert plan_epochs(30, 1, [1.0, 2.0], seeds=3, run_overhead=4)[0] == 4  # 6 runs start: 24 s
    epochs, note = plan_epochs(30, 0.01, [10.0, 20.0], seeds=3)
    assert epochs == 1 and 'below one epoch' in note


def test_data_kind_is_detected(tmp_path):
    assert ablate.detect_dataset(None) == 'digits'
    (tmp_path / 'cifar-10-batches-py').mkdir()
    assert ablate.detect_dataset(str(tmp_path)) == 'cifar10'
    assert ablate.detect_dataset(str(tmp_path / 'cifar-10-batches-py')) == 'cifar10'
    (tmp_path / 'f' / 'train').mkdir(parents=True)
    assert ablate.detect_dataset(str(tmp_path / 'f')) == 'folder'
    with pytest.raises(UserError, match='no such folder'):
        ablate.detect_dataset(str(tmp_path / 'missing'))


# -- outputs --------------------------------------------------------------------------------------
def _result(seeds=3):
    base = {'t2t': 90, 'wo_t2t': 80, 'conv_t2t': 88, 'transformer_t2t': 90.5, 'shallow_wide': 91}
    spread = [-1.0, 0.0, 1.0]  # standard deviation 1 over 3 seeds: standard error of a difference 0.82
    runs = [Run(k, VARIANTS[k]['model'], s, 5, 16, 300_000, 9_000_000 + 1_000_000 * i, base[k] + spread[s],
                base[k] + 1, 10.0) for s in range(seeds) for i, k in enumerate(VARIANTS)]
    verdicts = [judge(e, ablate._scores(runs, e.a), ablate._scores(runs, e.b)) for e in EFFECTS]
    return Ablation(runs, verdicts, 'digits', 16, 5, seeds, 150.0, machine='CPU, 2 thread(s)')


def test_outputs_are_a_csv_per_run_a_picture_and_a_one_paragraph_summary(tmp_path):
    files = ablate.write_outputs(_result(), tmp_path)
    assert [f.name for f in files] == ['ablation.csv', 'ablation.png', 'summary.md']
    with open(files[0]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and {r['variant'] for r in rows} == set(VARIANTS)
    assert {'label', 'model', 'seed', 'epochs', 'params', 'macs', 'top1'} <= set(rows[0])
    with Image.open(files[1]) as im:
        assert im.size == (1300, 600)
    text = files[2].read_text().split('\n\n')
    assert len(text) == 2 and text[1].count('\n') <= 1  # a title and one paragraph
    paragraph = text[1]
    assert 'T2T module vs plain patches (Table 7): +10.0 ± 0.8 points here, paper +2.0: reproduced.' in paragraph
    assert ('deep-narrow vs shallow-wide backbone (Table 7): -1.0 ± 0.8 points here, paper +2.7: '
            'opposite direction, within seed noise.') in paragraph
    assert 'Performer vs Transformer in the T2T module (Table 7): -0.5 ± 0.8' in paragraph
    assert 'without T2T (4x4 patches) 80.0 ± 1.0' in paragraph and '3 seeds' in paragraph


# -- end to end, tiny ----------------------------------------------------------------------------
@pytest.fixture
def tiny_folder(tmp_path):
    rng = np.random.RandomState(0)
    for split, n in (('train', 6), ('val', 3)):
        for c, colour in enumerate([(220, 20, 20), (20, 20, 220)]):
            d = tmp_path / 'data' / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(colour) + rng.randint(-20, 20, (16, 16, 3)), 0, 255).astype('uint8')
                Image.fromarray(a).save(d / f'{i}.png')
    return tmp_path / 'data'


def test_ablate_cli_trains_every_variant_through_the_engine(tiny_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    rc = main(['ablate', str(tiny_folder), '--epochs', '1', '--seeds', '1', '--img-size', '16', '--jobs', '2',
               '-o', str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-3:] == [str(out / f) for f in ('ablation.csv', 'ablation.png',
                                                                          'summary.md')]
    assert 'At small scale (folder, 16x16, 1 epochs' in printed
    with open(out / 'ablation.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['variant'] for r in rows] == list(VARIANTS)
    assert all(r['epochs'] == '1' and 0 <= float(r['top1']) <= 100 for r in rows)
    assert all((out / 'runs' / f'{k}-seed0' / 'last.pth').is_file() for k in VARIANTS)
    with Image.open(out / 'ablation.png') as im:
        assert im.size == (1300, 600)


def test_ablate_in_one_process_trains_the_chosen_variants(tiny_folder, tmp_path):
    lines = []
    result = ablate.run_ablation(str(tiny_folder), epochs=2, seeds=1, img_size=8, variants=['wo_t2t'], jobs=1,
                                 out_dir=tmp_path, log=lines.append)
    assert [(r.variant, r.epochs, r.img_size) for r in result.runs] == [('wo_t2t', 2, 8)]
    assert result.verdicts == [] and lines[-1].startswith('[1/1] without T2T')
    assert (tmp_path / 'runs' / 'wo_t2t-seed0' / 'last.pth').is_file()


@pytest.mark.parametrize('args, message', [
    (['--epochs', '0'], '--epochs 0: must be at least 1'),
    (['--img-size', '18'], '--img-size 18: must be a multiple of 4'),
    (['MISSING'], 'no such folder'),
])
def test_ablate_user_mistakes_are_one_line(args, message, tmp_path, capsys):
    args = [str(tmp_path / 'missing') if a == 'MISSING' else a for a in args]
    assert main(['ablate', *args, '-o', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1


def test_ablate_holds_out_a_split_of_a_folder_without_val(tiny_folder, tmp_path):
    # CIFAR-10 as JPEG folders: DATA/<class>/*.jpg, no val/
    result = ablate.run_ablation(str(tiny_folder / 'train'), epochs=1, seeds=1, img_size=8, variants=['wo_t2t'],
                                 jobs=1, out_dir=tmp_path, val_split=0.34, log=lambda *_: None)
    saved = torch.load(tmp_path / 'runs' / 'wo_t2t-seed0' / 'last.pth', map_location='cpu', weights_only=True)
    assert saved['config']['val_split'] == 0.34 and saved['config']['cache_images'] is True
    assert len(result.runs) == 1
    with pytest.raises(UserError, match=r'--val-split 0\.1'):
        ablate.run_ablation(str(tiny_folder / 'train'), epochs=1, seeds=1, img_size=8, variants=['wo_t2t'], jobs=1,
                            out_dir=tmp_path, log=lambda *_: None)


def test_killing_ablate_ends_its_worker_processes(tmp_path):
    """The pool's workers are spawned processes: when ablate is killed they must not train on alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from train_helpers import subprocess_env

    parent = subprocess.Popen([sys.executable, '-m', 't2tvit', 'ablate', '--epochs', '30', '--seeds', '3',
                               '--budget-minutes', '60', '--jobs', '2', '-o', str(tmp_path / 'out')],
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers():
        found = []
        for pid in os.listdir('/proc'):
            try:
                with open(f'/proc/{pid}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    spawned = b'spawn_main' in f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent.pid and spawned:
                found.append(int(pid))
        return found

    running = []
    try:
        deadline = time.time() + 120
        while len(workers()) < 2 and time.time() < deadline and parent.poll() is None:
            time.sleep(0.5)
        running = workers()
        assert len(running) == 2, 'the ablation did not start its 2 workers'
        time.sleep(3)  # past the workers' initializer
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 30
        alive = running
        while alive and time.time() < deadline:
            time.sleep(0.5)
            alive = [p for p in running if os.path.exists(f'/proc/{p}') and
                     open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z']
        assert not alive, f'workers {alive} still running after ablate was killed'
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in running:
            if os.path.exists(f'/proc/{p}'):
                os.kill(p, signal.SIGKILL)
