"""evaluate.py: the TG-DP supplement's figures (training dynamics, t-SNE embedding map, retrieval case
study) and the sound-source localisation metrics (cIoU, AUC, pointing game) against hand-computed
cases and independent re-computations."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
from model import CAVMAESync, ModelConfig, make_teacher
from scripts.synth import make_synthetic

TINY = dict(audio_length=64, img_size=32, embed_dim=64, num_heads=4, modality_depth=1, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=4, num_registers=2)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """40 clips of 4 classes (32 train, 8 eval) with object masks, frames at the tiny model's size."""
    out = str(tmp_path_factory.mktemp('synth'))
    make_synthetic(out, num_clips=40, seed=0, num_classes=4, frame_size=32)
    return dict(dir=out, train=os.path.join(out, 'train.json'), eval=os.path.join(out, 'eval.json'),
                labels=os.path.join(out, 'labels.csv'))


def write_ckpt(path, seed):
    torch.manual_seed(seed)
    config = ModelConfig(**TINY)
    model = CAVMAESync(config)
    torch.save(dict(model=model.state_dict(), teacher=make_teacher(model).state_dict(),
                    model_args=dataclasses.asdict(config), config={}, iter_num=0, epoch=0), path)
    return str(path)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpts')
    os.makedirs(root / 'runA')
    os.makedirs(root / 'runB')
    return write_ckpt(root / 'runA' / 'ckpt.pt', 0), write_ckpt(root / 'runB' / 'ckpt.pt', 1)


def png(path):
    with Image.open(path) as img:
        assert img.format == 'PNG'
        return np.asarray(img.convert('RGB'))


def has_colour(pixels, colour):
    return bool((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).any())


# --- localisation metrics -------------------------------------------------------------------

def test_ciou_hand_cases():
    heat = torch.arange(16.0).view(4, 4)  # ranks 8..15 (the two bottom rows) are predicted
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[2:, :2] = True  # 4 pixels, all predicted; 4 predicted pixels lie outside
    assert evaluate.ciou(heat, gt) == pytest.approx(4 / (4 + 4))
    gt_half = torch.zeros(4, 4, dtype=torch.bool)
    gt_half[2:] = True
    assert evaluate.ciou(heat, gt_half) == pytest.approx(1.0)
    assert evaluate.ciou(-heat, gt_half) == pytest.approx(0.0)
    weights = torch.zeros(4, 4)  # LVS consensus weights: 1 where two annotators agree, 0.5 for one
    weights[3, :2], weights[0, 0] = 1.0, 0.5  # predicted on it: 2 x 1.0; gt total 2.5; 6 predicted pixels off it
    assert evaluate.ciou(heat, weights) == pytest.approx(2.0 / (2.5 + 6))
    assert evaluate.ciou(torch.ones(4, 4), gt) == pytest.approx(4 / 16)  # a flat map predicts every pixel


def test_centre_prior_and_pointing_hand_cases():
    prior = evaluate.centre_prior(5, 5)
    # distances from the centre of a 5x5 grid: 0 (1 px), 1 (4), sqrt2 (4), 2 (4), sqrt5 (8), sqrt8 (4);
    # the value of rank 12 (ascending) is distance 2, so the 13 pixels within distance 2 are predicted
    centre = torch.zeros(5, 5, dtype=torch.bool)
    centre[2, 2] = True
    assert evaluate.ciou(prior, centre) == pytest.approx(1 / 13)
    assert evaluate.pointing_hit(prior, centre)
    corner = torch.zeros(5, 5, dtype=torch.bool)
    corner[0, 0] = True
    assert not evaluate.pointing_hit(prior, corner) and evaluate.ciou(prior, corner) == 0.0
    heat = torch.zeros(3, 4)
    heat[1, 2] = 5.0
    gt = torch.zeros(3, 4, dtype=torch.bool)
    gt[1, 2] = True
    assert evaluate.pointing_hit(heat, gt) and not evaluate.pointing_hit(heat, ~gt)


def test_localization_summary_hand_case():
    # success(thr) = share of cIoU >= thr on 0, 0.05, ..., 1: 1 up to 0.1, 0.75 up to 0.5, 0.5 up to 0.7,
    # 0.25 up to 0.95, 0 at 1; trapezoids of width 0.05 sum to 11.75 x 0.05 = 0.5875
    out = evaluate.localization_summary([0.12, 0.52, 0.73, 0.98], [True, False, True, True])
    assert out['cIoU@0.5'] == pytest.approx(75.0)
    assert out['AUC'] == pytest.approx(58.75)
    assert out['mean cIoU'] == pytest.approx(100 * (0.12 + 0.52 + 0.73 + 0.98) / 4)
    assert out['pointing'] == pytest.approx(75.0) and out['frames'] == 4


def reference_ciou(heat, gt):
    """numpy, written out from the LVS / EZ-VSL evaluation: normalise, threshold at the median, cIoU."""
    heat = heat.astype(np.float64)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    thr = np.sort(heat.flatten())[int(heat.shape[0] * heat.shape[1] * 0.5)]
    pred = (heat >= thr).astype(np.float64)
    gt = gt.astype(np.float64)
    return np.sum(pred * gt) / (np.sum(gt) + np.sum(pred * (gt == 0)))


def test_localization_scores_match_per_frame_reference(synth, ckpts, monkeypatch):
    """The metrics are the reference's on the very maps the batched path scored, and those maps equal a per-frame
    recomputation to float tolerance. (Scoring the recomputed map instead would compare two forward orders at a
    median threshold: a bilinear upsampling of a 2x2 map has many exactly tied values there, so one ulp moves
    pixels across it.)"""
    model = evaluate.load_model(ckpts[0])
    ds = data.AVDataset(synth['eval'], mode='eval', audio_length=64, img_size=32, masks=True)
    maps, original = [], evaluate.localization_map
    monkeypatch.setattr(evaluate, 'localization_map', lambda *a: maps.append(original(*a)) or maps[-1])
    scores = evaluate.localization_scores(model, ds, batch_size=3)
    heats = torch.cat(maps)  # (frames, H, W) in the order of per_frame
    meta = json.load(open(os.path.join(synth['dir'], 'synth_meta.json')))
    expected = [(item['id'], t) for item in (ds[i] for i in range(len(ds))) for t in range(16) if meta[item['id']]['on'][t]]
    assert [(r['id'], r['frame']) for r in scores['per_frame']] == expected
    assert scores['skipped'] == {'no mask file': 0, 'empty mask': 16 * len(ds) - len(expected)}
    items = {item['id']: item for item in (ds[i] for i in range(len(ds)))}
    cious, hits = [], []
    with torch.no_grad():
        for row, heat in zip(scores['per_frame'], heats):
            item, t = items[row['id']], row['frame']
            g_a, _, _, tok = model.forward_features(item['audio'][t][None], item['image'][t][None])
            cos = F.cosine_similarity(g_a[:, None], tok, dim=-1).view(1, 1, 2, 2)
            again = F.interpolate(cos, size=(32, 32), mode='bilinear', align_corners=False)[0, 0]
            torch.testing.assert_close(heat, again, rtol=0, atol=1e-5)
            gt = item['mask'][t].numpy()
            c = reference_ciou(heat.numpy(), gt)
            assert row['model']['cIoU'] == pytest.approx(c, abs=1e-12)
            cious.append(c)
            hits.append(bool(gt.flatten()[heat.numpy().flatten().argmax()]))
    assert scores['model']['cIoU@0.5'] == pytest.approx(100 * np.mean(np.array(cious) >= 0.5))
    assert scores['model']['pointing'] == pytest.approx(100 * np.mean(hits))


def test_localize_cli_runs_without_autograd_and_writes_metrics(synth, ckpts, tmp_path, monkeypatch, capsys):
    grad_states = []
    original = CAVMAESync.forward_features

    def spy(self, *args, **kwargs):
        grad_states.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CAVMAESync, 'forward_features', spy)
    out = str(tmp_path / 'loc')
    evaluate.main(['localize', '--ckpt', ckpts[0], '--data', synth['eval'], '--out', out, '--num_clips', '2',
                   '--num_workers', '0', '--batch_size', '2'])
    assert grad_states and not any(grad_states)  # pictures and metrics: no autograd graph
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert set(metrics) >= {'model', 'centre prior', 'skipped', 'per_frame'}
    printed = capsys.readouterr().out
    for name in ('model', 'centre prior'):
        line = next(l for l in printed.splitlines() if l.startswith(name))
        assert line.split()[-4:] == [f"{metrics[name][k]:.1f}" for k in ('cIoU@0.5', 'AUC', 'mean cIoU', 'pointing')]
    assert len([f for f in os.listdir(out) if f.endswith('.png')]) == 2


def test_localize_draws_the_mask_outline(synth, ckpts, tmp_path):
    model = evaluate.load_model(ckpts[0])
    ds = data.AVDataset(synth['eval'], mode='eval', audio_length=64, img_size=32, masks=True)
    meta = json.load(open(os.path.join(synth['dir'], 'synth_meta.json')))
    clip = next(i for i in range(len(ds)) if meta[ds.clips[i]['id']]['on'][8])  # object visible in frame 8
    sub = torch.utils.data.Subset(ds, [clip])
    path = evaluate.localize(model, sub, str(tmp_path), frame=8, num_clips=1)[0]
    pixels = png(path)
    s = evaluate.localize_scale(32, 32)
    outline = evaluate.mask_outline(ds[clip]['mask'][8]).numpy()
    overlay = pixels[s // 2::s, 32 * s + s // 2::s][:32, :32]  # the middle of each enlarged source pixel
    assert outline.any() and (overlay[outline] > 200).all()


# --- training dynamics ----------------------------------------------------------------------

def write_log(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for it, a, v, c in rows:
            f.write(json.dumps(dict(iter=it, rec_a=a, rec_v=v, con=c, loss=a + v + c)) + '\n')
        f.write(json.dumps({'iter': rows[-1][0], 'retrieval': {'V->A': {'R@1': 1.0}, 'A->V': {'R@1': 2.0}}}) + '\n')


def test_dynamics_plots_each_run_and_term(tmp_path, capsys):
    a, b = str(tmp_path / 'tgdp' / 'log.jsonl'), str(tmp_path / 'sync' / 'log.jsonl')
    write_log(a, [(20, 1.0, 0.8, 3.0), (40, 0.7, 0.6, 2.0), (60, 0.5, 0.4, 1.0)])
    write_log(b, [(20, 1.1, 0.9, 3.3), (40, 0.9, 0.8, 2.9), (40, 0.8, 0.7, 2.5), (60, 0.6, 0.5, 2.2)])  # resumed at 40
    out = str(tmp_path / 'dyn.png')
    evaluate.main(['dynamics', '--logs', a, b, '--out', out, '--width', '900', '--height', '300'])
    curves = evaluate.dynamics_plot([a, b], out, width=900, height=300)
    assert curves['tgdp']['con'] == ([20, 40, 60], [3.0, 2.0, 1.0])
    assert curves['sync']['rec_a'] == ([20, 40, 60], [1.1, 0.8, 0.6])  # the resumed iteration's last record
    pixels = png(out)
    assert pixels.shape == (300, 900, 3)
    for k in range(3):  # every panel holds both runs' lines
        panel = pixels[30:, 300 * k:300 * (k + 1)]
        assert has_colour(panel, evaluate.class_colour(0)) and has_colour(panel, evaluate.class_colour(1))
    with pytest.raises(ValueError, match="no 'dis'"):
        evaluate.dynamics_plot([a], out, keys=('dis',))


# --- t-SNE ----------------------------------------------------------------------------------

def test_tsne_gradient_is_the_exact_kl_gradient():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 5, dtype=torch.float64, generator=g)
    P = evaluate.tsne_conditional(X, perplexity=4.0)
    P = (P + P.T) / (2 * 12)
    Y = torch.randn(12, 2, dtype=torch.float64, generator=g).requires_grad_()
    num = 1 / (1 + ((Y[:, None] - Y[None]) ** 2).sum(-1))  # (N, N), written out again
    num = num * (1 - torch.eye(12, dtype=torch.float64))
    Q = num / num.sum()
    off = ~torch.eye(12, dtype=torch.bool)
    kl = (P[off] * (P[off] / Q[off]).log()).sum()
    kl.backward()
    value, grad = evaluate.tsne_kl_gradient(P, Y.detach())
    assert value == pytest.approx(kl.item(), rel=1e-10)
    assert torch.allclose(grad, Y.grad, rtol=1e-9, atol=1e-12)


def test_tsne_affinities_have_the_asked_perplexity():
    X = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    for perplexity in (5.0, 15.0):
        P = evaluate.tsne_conditional(X, perplexity).numpy()
        assert np.allclose(P.sum(axis=1), 1) and np.allclose(np.diag(P), 0)
        entropy = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1)), 0), axis=1)
        assert np.allclose(np.exp(entropy), perplexity, rtol=1e-3)


def test_tsne_keeps_well_separated_clusters_as_neighbours():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(5, 20, dtype=torch.float64, generator=g) * 10
    labels = torch.arange(5).repeat_interleave(24)
    X = centres[labels] + torch.randn(120, 20, dtype=torch.float64, generator=g)
    Y = evaluate.tsne(X, perplexity=15.0, iters=500)
    assert Y.shape == (120, 2) and torch.isfinite(Y).all()
    d = torch.cdist(Y, Y)
    d.fill_diagonal_(float('inf'))
    nearest = d.topk(10, largest=False).indices  # (120, 10)
    assert (labels[nearest] == labels[:, None]).double().mean() > 0.99
    centroid = torch.stack([Y[labels == k].mean(0) for k in range(5)])
    spread = max((Y[labels == k] - centroid[k]).norm(dim=1).max().item() for k in range(5))
    gaps = torch.cdist(centroid, centroid) + torch.eye(5) * 1e9
    assert gaps.min().item() > 2 * spread  # every cluster stays apart from the others


def test_embed_tsne_two_checkpoints(synth, ckpts, tmp_path):
    out = str(tmp_path / 'tsne.png')
    evaluate.main(['embed', '--ckpt', ckpts[0], '--compare', ckpts[1], '--method', 'tsne', '--data', synth['train'],
                   '--label_csv', synth['labels'], '--out', out, '--size', '400', '--num_workers', '0'])
    pixels = png(out)
    legend = 400 * 2 // 7
    panel = 400 - legend
    assert pixels.shape == (400, 2 * panel + legend, 3)
    for p in range(2):
        for k in range(4):
            assert has_colour(pixels[:, p * panel:(p + 1) * panel], evaluate.class_colour(k))


def test_embed_max_classes_keeps_the_most_frequent():
    cls = [0, 1, 1, 2, 2, 2, -1, 3]
    assert evaluate.top_classes(cls, 2) == [1, 2, 3, 4, 5]
    assert evaluate.top_classes([-1, -1], 2) == [0, 1]  # unlabelled clips: all, drawn grey


# --- retrieval case study -------------------------------------------------------------------

def test_case_study_topk_is_the_retrieval_ranking():
    g = torch.Generator().manual_seed(3)
    feats = dict(g_a=torch.randn(30, 4, 8, generator=g), g_v=torch.randn(30, 4, 8, generator=g))
    feats['g_v'][:10] += 1.5 * feats['g_a'][:10]  # some true matches rank high
    queries = [0, 3, 7, 12, 25]
    idx, scores, ranks = evaluate.case_study(feats, queries, k=5)
    for q, i in enumerate(queries):  # brute force: mean over frames of cosines, sorted
        s = [np.mean([F.cosine_similarity(feats['g_a'][i, t], feats['g_v'][j, t], dim=0).item() for t in range(4)])
             for j in range(30)]
        assert idx[q].tolist() == list(np.argsort(s)[::-1][:5])
        assert scores[q].tolist() == pytest.approx(sorted(s, reverse=True)[:5], abs=1e-6)
    sim = evaluate.similarity(feats['g_a'], feats['g_v'])
    full_ranks = (sim >= sim.diagonal()[:, None]).sum(dim=1)  # retrieval_metrics' A->V ranks
    assert ranks.tolist() == full_ranks[queries].tolist()
    metrics = evaluate.retrieval_metrics(sim)
    assert metrics['R@5'] == pytest.approx(100 * (full_ranks <= 5).double().mean().item())
    for q, i in enumerate(queries):
        assert (i in idx[q].tolist()) == (ranks[q] <= 5)
        if i in idx[q].tolist():
            assert idx[q].tolist().index(i) + 1 == ranks[q]


def test_cases_plot_outlines_the_true_match(synth, ckpts, tmp_path):
    args = argparse_like(ckpts[0])
    feats = [evaluate.features_for(args, synth['eval']), evaluate.features_for(argparse_like(ckpts[1]), synth['eval'])]
    feats[1]['g_v'] = feats[1]['g_a'].clone()  # checkpoint 2 made perfect: each query's own clip ranks first
    ds = data.AVDataset(synth['eval'], mode='eval', audio_length=64, img_size=32)
    out = str(tmp_path / 'cases.png')
    result = evaluate.cases_plot(ds, feats, out, queries=[1, 4, 6], k=3, cell=40)
    pixels = png(out)
    green = np.array([0, 200, 0], dtype=np.uint8)
    for p in range(2):
        idx, _, _ = evaluate.case_study(feats[p], [1, 4, 6], 3)
        assert torch.equal(result['topk'][p], idx)
        for q, i in enumerate([1, 4, 6]):
            for j, c in enumerate(idx[q].tolist()):
                x0, y0, x1, y1 = result['boxes'][(p, q, j)]
                edge = pixels[y0 - 2, x0 - 2:x1 + 2]  # the row just above the cell: its outline
                assert (edge == green).all(axis=-1).any() == (c == i)
    assert result['topk'][1][:, 0].tolist() == [1, 4, 6]
    cli = str(tmp_path / 'cases_cli.png')
    evaluate.main(['cases', '--ckpt', ckpts[0], '--compare', ckpts[1], '--data', synth['eval'], '--out', cli,
                   '--num_queries', '2', '--k', '3', '--num_workers', '0'])
    assert png(cli).std() > 5


def argparse_like(ckpt):
    import argparse
    return argparse.Namespace(ckpt=ckpt, weights='model', device='cpu', batch_size=8, num_workers=0, num_frames=16,
                              cache=None)


def test_ciou_top_share():
    heat = torch.arange(16.0).view(4, 4)
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[3, 2:] = True  # the two highest values
    assert evaluate.ciou(heat, gt) == pytest.approx(2 / 8)  # top half: 8 pixels predicted
    assert evaluate.ciou(heat, gt, top=2 / 16) == pytest.approx(1.0)  # the top 2 pixels: exactly the object
    assert evaluate.ciou(heat, gt, top=4 / 16) == pytest.approx(2 / 4)


def test_keep_overlap_is_the_pairwise_jaccard():
    gen = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(7)])  # (7, 4)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    ref = [len(set(keep[i].tolist()) & set(keep[j].tolist())) / len(set(keep[i].tolist()) | set(keep[j].tolist()))
           for i in range(7) for j in range(7) if groups[i] != groups[j]]
    assert evaluate.keep_overlap(keep, groups, 10) == pytest.approx(np.mean(ref))


def test_view_scores_on_a_planted_teacher(tmp_path):
    """A teacher whose visual priority is the object and whose audio priority is the same ranking for every
    clip: the guided view keeps all of the object and the same audio patches everywhere; random views keep
    about half of everything."""
    T, S, p = 4, 32, 8  # 4 frames of 32 x 32 pixels, 4 x 4 patches; the object: a 2 x 2 patch block
    gen = torch.Generator().manual_seed(0)
    items = []
    for n in range(12):
        mask = torch.zeros(T, S, S, dtype=torch.bool)
        for t in range(T):
            r, c = torch.randint(0, 3, (2,), generator=gen).tolist()
            mask[t, r * p:(r + 2) * p, c * p:(c + 2) * p] = True
        items.append(dict(audio=torch.zeros(T, 16, 16), image=mask.float()[:, None].expand(T, 3, S, S),
                          mask=mask, has_mask=torch.ones(T, dtype=torch.bool), label=torch.zeros(0), id=str(n)))

    def forward_teacher(audio, image, normalize=True):
        p_v = image[:, 0].unfold(1, p, p).unfold(2, p, p).sum((-1, -2)).flatten(1) + 1e-3  # (B, 16)
        p_a = torch.arange(1.0, 21.0).expand(audio.shape[0], 20)  # one ranking for every clip
        return None, None, p_a, p_v

    model = type('Teacher', (), dict(config=ModelConfig(patch_size=p), forward_teacher=staticmethod(forward_teacher)))
    scores = evaluate.view_scores(model, items, mask_ratio=0.5, batch_size=5)
    guided, rand = scores['guided'], scores['random']
    assert guided['v']['object'] == pytest.approx(100) and guided['v']['priority'] > 99
    assert guided['a']['overlap'] == pytest.approx(100)
    assert guided['a']['priority'] == pytest.approx(100 * sum(range(11, 21)) / sum(range(1, 21)))
    assert 35 < rand['v']['object'] < 65 and 40 < rand['v']['priority'] < 60 and 25 < rand['a']['overlap'] < 45


def test_views_cli(synth, ckpts, tmp_path, capsys):
    out = str(tmp_path / 'views.json')
    evaluate.main(['views', '--ckpt', ckpts[0], '--weights', 'teacher', '--data', synth['eval'], '--num_clips', '3',
                   '--num_workers', '0', '--out', out])
    views = json.load(open(out))['views']
    assert set(views) == set(evaluate.masking.CONTRASTIVE_MASKINGS)
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith('guided'))
    g = views['guided']
    assert line.split()[1:] == [f"{v:.1f}" for v in (g['a']['priority'], g['a']['overlap'], g['v']['priority'],
                                                       g['v']['overlap'], g['v']['object'])]
