"""train.py's settings for the releases' choices: InfoNCE direction and negatives (CAV-MAE Sync: visual queries,
one rank's batch) and the TG-DP release's Gumbel reading (raw teacher attention); defaults unchanged."""
import os
import runpy
import signal
import subprocess
import sys

import pytest

import losses
import masking

from test_train import ROOT, TINY, synth  # noqa: F401 (synth: the 40-clip fixture)


def run_train(args, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py', *TINY, '--max_iters=2', *args])
    monkeypatch.chdir(ROOT)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        signal.signal(signal.SIGTERM, handler)  # train.py installs its pre-emption handler


OPTIONS = [[], ['--method=sync', '--contrastive_direction=v2a', '--contrastive_negatives=local'],
           ['--contrastive_masking=gumbel', '--contrastive_direction=a2v']]


@pytest.mark.parametrize('options', OPTIONS)
def test_train_py_passes_contrastive_settings_and_raw_attention_to_gumbel(options, synth, tmp_path, monkeypatch):
    seen = {'nce': [], 'gumbel': []}
    info_nce, gumbel = losses.info_nce, masking.gumbel_score_keep

    def spy_nce(g_a, g_v, temperature, direction='both', negatives='global'):
        seen['nce'].append((direction, negatives))
        return info_nce(g_a, g_v, temperature, direction, negatives)

    def spy_gumbel(scores, mask_ratio, noise=None):
        seen['gumbel'].append(scores)
        return gumbel(scores, mask_ratio, noise)
    monkeypatch.setattr(losses, 'info_nce', spy_nce)
    monkeypatch.setattr(masking, 'gumbel_score_keep', spy_gumbel)
    run_train([*options, f'--train_json={synth / "train.json"}', f'--out_dir={tmp_path}'], monkeypatch)
    settings = dict(a.lstrip('-').split('=') for a in options)
    want = (settings.get('contrastive_direction', 'both'), settings.get('contrastive_negatives', 'global'))
    assert seen['nce'] == [want] * 2  # the defaults are unchanged: both directions, every rank's negatives
    if settings.get('contrastive_masking') == 'gumbel':
        assert len(seen['gumbel']) == 4  # audio and visual, 2 steps
        for scores in seen['gumbel']:  # the teacher's raw attention, not normalised over patches
            assert (scores > 0).all() and (scores < 1).all() and (scores.sum(1) - 1).abs().min() > 1e-3
    else:
        assert seen['gumbel'] == []


def test_bad_contrastive_settings_are_clear_errors(tmp_path):
    for arg, message in (('--contrastive_direction=av', 'contrastive_direction must be'),
                         ('--contrastive_negatives=rank', 'contrastive_negatives'),
                         ('--contrastive_masking=gumbel_paper', 'contrastive_masking must be one of')):
        proc = subprocess.run([sys.executable, 'train.py', *TINY, arg, f'--out_dir={tmp_path}'], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
