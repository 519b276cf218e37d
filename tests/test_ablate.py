"""evaluate.py ablate at tiny size: two rows, two seeds, two iterations. It trains with train.py, and
its table, JSON and learning curves must hold exactly the per-run results of the runs' own logs; a
second call trains nothing (resumable)."""
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

import evaluate

TRAIN_ARGS = ['--batch_size=8', '--num_workers=0']  # 16 training clips: 2 steps an epoch
DESIGN = {**evaluate.ABLATION_DATA, 'num_clips': 20, 'num_classes': 2, 'frame_size': 32}  # 4 held-out clips


def test_ablate_tiny_table_equals_the_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out_dir = str(tmp_path / 'ablate')
    kwargs = dict(mode='quick', runs=['sync', 'tgdp'], seeds=2, max_iters=2, eval_interval=1, design=DESIGN,
                  train_args=TRAIN_ARGS)
    result = evaluate.ablate(out_dir, **kwargs)
    printed = capsys.readouterr().out
    saved = json.load(open(os.path.join(out_dir, 'ablation.json')))
    assert saved['runs'] == json.loads(json.dumps(result['runs']))
    assert saved['settings'] == {'seeds': 2, 'max_iters': 2, 'eval_interval': 1}
    with Image.open(os.path.join(out_dir, 'ablation.png')) as img:
        assert img.format == 'PNG' and np.asarray(img.convert('RGB')).std() > 5

    for run, label in (('sync', 'CAV-MAE Sync (one pass, 75%)'), ('tgdp', 'TG-DP')):
        finals, curves = [], []
        for seed in (0, 1):  # the run's own log, read here without evaluate.py
            records = [json.loads(line) for line in open(os.path.join(out_dir, 'runs', run, f'seed{seed}', 'log.jsonl'))]
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
    paired_line = [l for l in printed.splitlines() if l.startswith('Table 5: CAV-MAE Sync')][-1].split()[-6:]
    for i, (d, k) in enumerate(evaluate.RECALLS):
        better = sum(sync[seed][d][k] > tgdp[seed][d][k] for seed in ('0', '1'))
        assert saved['paired']['sync'][d][k] == [better, 2] and paired_line[i] == f'{better}/2'
    assert set(saved['paired']) == {'sync'}
    # the settings are stated next to the table
    assert f"offscreen={DESIGN['offscreen']}" in printed and '2 iterations' in printed

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')
    monkeypatch.setattr(subprocess, 'run', no_training)
    again = evaluate.ablate(out_dir, **kwargs)
    assert json.loads(json.dumps(again['runs'])) == saved['runs']
    with pytest.raises(ValueError, match='other settings'):
        evaluate.ablate(out_dir, **{**kwargs, 'max_iters': 3})
    with pytest.raises(ValueError, match='another design'):
        evaluate.ablate(out_dir, **{**kwargs, 'design': {**DESIGN, 'hum': DESIGN['hum'] + 0.01}})
