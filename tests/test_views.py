"""scripts/views.py: what TG-DP's contrastive views keep (teacher priority mass, overlap across
clips, object pixels), on a planted teacher and through the command line with a random tiny
checkpoint."""
import json

import numpy as np
import pytest
import torch

import masking
from model import ModelConfig
from scripts import views

from test_localize import ckpt, synth  # noqa: F401  (the same tiny clips and random checkpoint)

pytestmark = pytest.mark.usefixtures('one_thread')


def test_keep_overlap_is_the_pairwise_jaccard():
    gen = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(7)])  # (7, 4)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    sets = [set(k.tolist()) for k in keep]
    ref = [len(sets[i] & sets[j]) / len(sets[i] | sets[j])
           for i in range(7) for j in range(7) if groups[i] != groups[j]]
    assert views.keep_overlap(keep, groups, 10) == pytest.approx(np.mean(ref))


def test_view_scores_on_a_planted_teacher(tmp_path):
    """A teacher whose visual priority is the object and whose audio priority is the same ranking
    for every clip: the guided view keeps all of the object and the same audio patches everywhere;
    random views keep about half of everything."""
    T, S, p = 4, 32, 8  # 4 frames of 32 x 32 pixels, 4 x 4 patches; the object: a 2 x 2 patch block
    gen = torch.Generator().manual_seed(0)
    items = []
    for n in range(12):
        mask = torch.zeros(T, S, S, dtype=torch.bool)
        for t in range(T):
            r, c = torch.randint(0, 3, (2,), generator=gen).tolist()
            mask[t, r * p:(r + 2) * p, c * p:(c + 2) * p] = True
        items.append(dict(audio=torch.zeros(T, 16, 16),
                          image=mask.float()[:, None].expand(T, 3, S, S),
                          mask=mask, has_mask=torch.ones(T, dtype=torch.bool), label=torch.zeros(0),
                          id=str(n)))

    def forward_teacher(audio, image):
        p_v = image[:, 0].unfold(1, p, p).unfold(2, p, p).sum((-1, -2)).flatten(1) + 1e-3  # (B, 16)
        p_a = torch.arange(1.0, 21.0).expand(audio.shape[0], 20)  # one ranking for every clip
        return None, None, p_a, p_v

    model = type('Teacher', (),
                 dict(config=ModelConfig(patch_size=p),
                      forward_teacher=staticmethod(forward_teacher)))
    scores = views.view_scores(model, items, mask_ratio=0.5, batch_size=5)
    guided, rand = scores['guided'], scores['random']
    assert guided['v']['object'] == pytest.approx(100) and guided['v']['priority'] > 99
    assert guided['a']['overlap'] == pytest.approx(100)
    assert guided['a']['priority'] == pytest.approx(100 * sum(range(11, 21)) / sum(range(1, 21)))
    assert 35 < rand['v']['object'] < 65 and 40 < rand['v']['priority'] < 60
    assert 25 < rand['a']['overlap'] < 45


def test_views_cli(synth, ckpt, tmp_path, capsys):
    out = str(tmp_path / 'views.json')
    views.main(['--ckpt', ckpt, '--weights', 'teacher', '--data', synth['eval'], '--num_clips', '3',
                '--num_workers', '0', '--out', out])
    kept = json.load(open(out))['views']
    assert set(kept) == set(masking.CONTRASTIVE_MASKINGS)
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith('guided'))
    g = kept['guided']
    assert line.split()[1:] == [f"{v:.1f}" for v in (g['a']['priority'], g['a']['overlap'],
                                                     g['v']['priority'],
                                                       g['v']['overlap'], g['v']['object'])]
