"""scripts/ablate.py at tiny size: two rows, two seeds, two iterations. It trains with train.py, and
its table, JSON and learning curves must hold exactly the per-run results of the runs' own logs; a
second call trains nothing (resumable). The paper's columns hold the TG-DP paper's numbers as
../shared/SPEC.md lists them."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from scripts import ablate

TRAIN_ARGS = ['--batch_size=8', '--num_workers=0']  # 16 training clips: 2 steps an epoch
DESIGN = {**ablate.ABLATION_DATA, 'num_clips': 20, 'num_classes': 2,
          'frame_size': 32}  # 4 held-out clips


def test_ablate_tiny_table_equals_the_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out_dir = str(tmp_path / 'ablate')
    kwargs = dict(mode='quick', runs=['sync', 'tgdp'], seeds=2, max_iters=2, eval_interval=1,
                  design=DESIGN, train_args=TRAIN_ARGS)
    result = ablate.ablate(out_dir, **kwargs)
    printed = capsys.readouterr().out
    saved = json.load(open(os.path.join(out_dir, 'ablation.json')))
    assert saved['runs'] == json.loads(json.dumps(result['runs']))
    assert saved['settings'] == {'seeds': 2, 'max_iters': 2, 'eval_interval': 1}
    with Image.open(os.path.join(out_dir, 'ablation.png')) as img:
        assert img.format == 'PNG' and np.asarray(img.convert('RGB')).std() > 5

    for run, label in (('sync', 'CAV-MAE Sync (one pass, 75%)'), ('tgdp', 'TG-DP')):
        finals, curves = [], []
        for seed in (0, 1):  # the run's own log, read here without scripts/
            records = [json.loads(line) for line in open(os.path.join(out_dir, 'runs', run,
                                                                      f'seed{seed}', 'log.jsonl'))]
            retrieval = [r for r in records if 'retrieval' in r]
            assert [r['iter'] for r in retrieval] == [1, 2]
            finals.append(retrieval[-1]['retrieval'])
            curves.append([r['retrieval']['V->A']['R@1'] for r in retrieval])
        s = saved['runs'][run]
        cells = []
        for d in ('V->A', 'A->V'):
            for k in ('R@1', 'R@5', 'R@10'):
                values = [f[d][k] for f in finals]
                assert s['mean'][d][k] == pytest.approx(np.mean(values))
                assert s['std'][d][k] == pytest.approx(np.std(values, ddof=1))
                cells.append(f'{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}')
        assert s['curve']['iters'] == [1, 2]
        assert s['curve']['V->A']['mean'] == pytest.approx(np.mean(curves, axis=0).tolist())
        assert s['curve']['V->A']['min'] == pytest.approx(np.min(curves, axis=0).tolist())
        line = next(l for l in printed.splitlines() if l.strip().startswith(label))
        assert ' '.join(line[len(label) + 2:].split()).startswith(' '.join(' '.join(cells).split()))
    # seed-paired comparison with TG-DP
    sync, tgdp = saved['runs']['sync']['final'], saved['runs']['tgdp']['final']
    paired_line = [l for l in printed.splitlines()
                   if l.startswith('Table 5: CAV-MAE Sync')][-1].split()[-6:]
    for i, (d, k) in enumerate(ablate.RECALLS):
        better = sum(sync[seed][d][k] > tgdp[seed][d][k] for seed in ('0', '1'))
        assert saved['paired']['sync'][d][k] == [better, 2] and paired_line[i] == f'{better}/2'
    assert set(saved['paired']) == {'sync'}
    # the settings are stated next to the table
    assert f"offscreen={DESIGN['offscreen']}" in printed and '2 iterations' in printed

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')
    monkeypatch.setattr(subprocess, 'run', no_training)
    again = ablate.ablate(out_dir, **kwargs)
    assert json.loads(json.dumps(again['runs'])) == saved['runs']
    with pytest.raises(ValueError, match='other settings'):
        ablate.ablate(out_dir, **{**kwargs, 'max_iters': 3})
    with pytest.raises(ValueError, match='another design'):
        ablate.ablate(out_dir, **{**kwargs, 'design': {**DESIGN, 'hum': DESIGN['hum'] + 0.01}})


def spec_paper_rows(spec_path):
    """The TG-DP paper's Tables 5-8 rows and its Table 3 sentence (two lines) from SPEC.md 9."""
    lines = open(spec_path).read().splitlines()
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) == 5 and cells[0] in ('5', '6', '7', '8'):
            rows[(cells[0], cells[1])] = cells[2:]
    n = next(i for i, l in enumerate(lines)
             if l.startswith('Unimodal attention probing, AS-20K mAP (TG-DP Table 3)'))
    return rows, lines[n] + ' ' + lines[n + 1]


# SPEC.md's row names -> this table's (title prefix, row label)
SPEC_ROWS = {('5', 'single pass (CAV-MAE Sync)'): ('Table 5', 'CAV-MAE Sync (one pass, 75%)'),
             ('5', 'dual pass, both passes random 75%'): ('Table 5', 'dual pass, both random 75%'),
             ('6', 'contrastive mask ratio 0.00'): ('Table 6', '0'),
             ('6', 'contrastive mask ratio 0.20'): ('Table 6', '0.2'),
             ('6', 'contrastive mask ratio 0.50 (TG-DP)'): ('Table 6', '0.5 (TG-DP)'),
             ('6', 'contrastive mask ratio 0.65'): ('Table 6', '0.65'),
             ('6', 'contrastive mask ratio 0.75'): ('Table 6', '0.75'),
             ('7', 'without distillation'): ('Table 7', 'without'),
             ('7', 'with distillation (TG-DP)'): ('Table 7', 'with (TG-DP)'),
             ('8', 'random mask'): ('Table 8', 'random'),
             ('8', 'distinct guided mask (TG-DP)'): ('Table 8', 'guided top-k (TG-DP)'),
             ('8', 'probabilistic guided (Gumbel) mask'): ('Table 8', 'Gumbel top-k')}


def test_printed_table_holds_the_papers_numbers(shared_dir, capsys):
    """Every row of the printed table shows the paper's V->A and A->V R@1/5/10 and AS-20K mAP of
    SPEC.md beside the laptop numbers, labelled as full-AudioSet numbers; Table 3 is printed
    below."""
    rows, table3 = spec_paper_rows(os.path.join(shared_dir, 'SPEC.md'))
    assert set(rows) == set(SPEC_ROWS)
    result = {'settings': {'seed': 0},
              'final': {d: {k: 10.0 for _, k in ablate.RECALLS[:3]} for d in ('V->A', 'A->V')},
              'curve': [[1, 10.0, 10.0]]}
    summary = ablate.summarize_runs({run: [result] for run in ablate.ABLATION_RUNS})
    ablate.print_ablation(summary, ['design line'])
    printed = capsys.readouterr().out.splitlines()
    starts = {}
    for n, line in enumerate(printed):  # title rows (the seed-paired rows repeat the names later)
        if line.startswith('Table '):
            starts.setdefault(line.split(':')[0], n)
    for key, (table, label) in SPEC_ROWS.items():
        line = next(l for l in printed[starts[table] + 1:] if l.strip().startswith(label + '  '))
        assert line.split()[-3:] == rows[key], (table, label)
    assert any('full AudioSet-2M' in l and 'not comparable in scale' in l for l in printed)
    numbers = [float(x) for x in re.findall(r'\d+\.\d', table3.split(':', 1)[1])]
    table3_line = next(l for l in printed if l.startswith('TG-DP paper Table 3'))
    assert [float(x) for x in re.findall(r'\d+\.\d', table3_line.split('):', 1)[1])] == numbers
