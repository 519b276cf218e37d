"""The picture tools: scripts/dynamics.py (TG-DP supplement Fig. 1), scripts/embed.py with its t-SNE
(Fig. 2), scripts/cases.py (Fig. 3) and scripts/reconstruct.py, against independent re-computations
and on a tiny synthetic set with random tiny checkpoints (nothing is trained)."""
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
from scripts import cases, dynamics, embed, reconstruct
from scripts.plot import class_colour
from scripts.synth import make_synthetic

TINY = dict(audio_length=64, img_size=32, embed_dim=64, num_heads=4, modality_depth=1,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_registers=2)
NUM_CLASSES = 4

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """40 clips of 4 classes (32 train, 8 eval) with object masks, frames at the tiny model size."""
    out = str(tmp_path_factory.mktemp('synth'))
    make_synthetic(out, num_clips=40, seed=0, num_classes=NUM_CLASSES, frame_size=32)
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


def assert_png(path, size):
    with Image.open(path) as img:
        assert img.format == 'PNG' and img.size == size
        pixels = np.asarray(img.convert('RGB'))
    assert pixels.std() > 5, f'{path} is (nearly) constant'
    return pixels


# --- training dynamics ----------------------------------------------------------------------

def write_log(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for it, a, v, c in rows:
            f.write(json.dumps(dict(iter=it, rec_a=a, rec_v=v, con=c, loss=a + v + c)) + '\n')
        f.write(json.dumps({'iter': rows[-1][0],
                            'retrieval': {'V->A': {'R@1': 1.0}, 'A->V': {'R@1': 2.0}}}) + '\n')


def test_dynamics_plots_each_run_and_term(tmp_path, capsys):
    a, b = str(tmp_path / 'tgdp' / 'log.jsonl'), str(tmp_path / 'sync' / 'log.jsonl')
    write_log(a, [(20, 1.0, 0.8, 3.0), (40, 0.7, 0.6, 2.0), (60, 0.5, 0.4, 1.0)])
    write_log(b,
              [(20, 1.1, 0.9, 3.3), (40, 0.9, 0.8, 2.9), (40, 0.8, 0.7, 2.5),
               (60, 0.6, 0.5, 2.2)])  # resumed at 40
    out = str(tmp_path / 'dyn.png')
    dynamics.main(['--logs', a, b, '--out', out, '--width', '900', '--height', '300'])
    curves = dynamics.dynamics_plot([a, b], out, width=900, height=300)
    assert curves['tgdp']['con'] == ([20, 40, 60], [3.0, 2.0, 1.0])
    assert curves['sync']['rec_a'] == ([20, 40, 60],
                                       [1.1, 0.8, 0.6])  # the resumed iteration's last record
    pixels = png(out)
    assert pixels.shape == (300, 900, 3)
    for k in range(3):  # every panel holds both runs' lines
        panel = pixels[30:, 300 * k:300 * (k + 1)]
        assert has_colour(panel, class_colour(0)) and has_colour(panel, class_colour(1))
    with pytest.raises(ValueError, match="no 'dis'"):
        dynamics.dynamics_plot([a], out, keys=('dis',))


# --- t-SNE ----------------------------------------------------------------------------------

def test_tsne_gradient_is_the_exact_kl_gradient():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 5, dtype=torch.float64, generator=g)
    P = embed.tsne_conditional(X, perplexity=4.0)
    P = (P + P.T) / (2 * 12)
    Y = torch.randn(12, 2, dtype=torch.float64, generator=g).requires_grad_()
    num = 1 / (1 + ((Y[:, None] - Y[None]) ** 2).sum(-1))  # (N, N), written out again
    num = num * (1 - torch.eye(12, dtype=torch.float64))
    Q = num / num.sum()
    off = ~torch.eye(12, dtype=torch.bool)
    kl = (P[off] * (P[off] / Q[off]).log()).sum()
    kl.backward()
    value, grad = embed.tsne_kl_gradient(P, Y.detach())
    assert value == pytest.approx(kl.item(), rel=1e-10)
    assert torch.allclose(grad, Y.grad, rtol=1e-9, atol=1e-12)


def test_tsne_affinities_have_the_asked_perplexity():
    X = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    for perplexity in (5.0, 15.0):
        P = embed.tsne_conditional(X, perplexity).numpy()
        assert np.allclose(P.sum(axis=1), 1) and np.allclose(np.diag(P), 0)
        entropy = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1)), 0), axis=1)
        assert np.allclose(np.exp(entropy), perplexity, rtol=1e-3)


def test_tsne_keeps_well_separated_clusters_as_neighbours():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(5, 20, dtype=torch.float64, generator=g) * 10
    labels = torch.arange(5).repeat_interleave(24)
    X = centres[labels] + torch.randn(120, 20, dtype=torch.float64, generator=g)
    Y = embed.tsne(X, perplexity=15.0, iters=500)
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
    embed.main(['--ckpt', ckpts[0], '--compare', ckpts[1], '--method', 'tsne', '--data',
                synth['train'],
                '--label_csv', synth['labels'], '--out', out, '--size', '400', '--num_workers',
                '0'])
    pixels = png(out)
    legend = 400 * 2 // 7
    panel = 400 - legend
    assert pixels.shape == (400, 2 * panel + legend, 3)
    for p in range(2):
        for k in range(4):
            assert has_colour(pixels[:, p * panel:(p + 1) * panel], class_colour(k))


def test_embed_max_classes_keeps_the_most_frequent():
    cls = [0, 1, 1, 2, 2, 2, -1, 3]
    assert embed.top_classes(cls, 2) == [1, 2, 3, 4, 5]
    assert embed.top_classes([-1, -1], 2) == [0, 1]  # unlabelled clips: all, drawn grey


# --- retrieval case study -------------------------------------------------------------------

def test_case_study_topk_is_the_retrieval_ranking():
    g = torch.Generator().manual_seed(3)
    feats = dict(g_a=torch.randn(30, 4, 8, generator=g), g_v=torch.randn(30, 4, 8, generator=g))
    feats['g_v'][:10] += 1.5 * feats['g_a'][:10]  # some true matches rank high
    queries = [0, 3, 7, 12, 25]
    idx, scores, ranks = cases.case_study(feats, queries, k=5)
    for q, i in enumerate(queries):  # brute force: mean over frames of cosines, sorted
        s = [np.mean([F.cosine_similarity(feats['g_a'][i, t], feats['g_v'][j, t],
                                          dim=0).item() for t in range(4)])
             for j in range(30)]
        # the brute-force scores of the picked candidates are the 5 best, best first (compared to
        # float tolerance, not as an index order that two near-tied scores could swap)
        best = sorted(s, reverse=True)[:5]
        assert [s[j] for j in idx[q].tolist()] == pytest.approx(best, abs=1e-6)
        assert scores[q].tolist() == pytest.approx(best, abs=1e-6)
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
    feats = [evaluate.features_for(ckpt, synth['eval']) for ckpt in ckpts]
    feats[1]['g_v'] = feats[1]['g_a'].clone()  # checkpoint 2 made perfect: each own clip first
    ds = data.AVDataset(synth['eval'], mode='eval', audio_length=64, img_size=32)
    out = str(tmp_path / 'cases.png')
    result = cases.cases_plot(ds, feats, out, queries=[1, 4, 6], k=3, cell=40)
    pixels = png(out)
    green = np.array([0, 200, 0], dtype=np.uint8)
    for p in range(2):
        idx, _, _ = cases.case_study(feats[p], [1, 4, 6], 3)
        assert torch.equal(result['topk'][p], idx)
        for q, i in enumerate([1, 4, 6]):
            for j, c in enumerate(idx[q].tolist()):
                x0, y0, x1, y1 = result['boxes'][(p, q, j)]
                edge = pixels[y0 - 2, x0 - 2:x1 + 2]  # the row just above the cell: its outline
                assert (edge == green).all(axis=-1).any() == (c == i)
    assert result['topk'][1][:, 0].tolist() == [1, 4, 6]
    cli = str(tmp_path / 'cases_cli.png')
    cases.main(['--ckpt', ckpts[0], '--compare', ckpts[1], '--data', synth['eval'], '--out', cli,
                '--num_queries', '2', '--k', '3', '--num_workers', '0'])
    assert png(cli).std() > 5


# --- reconstruction and PCA map ------------------------------------------------------------

def test_reconstruct_writes_grid(synth, ckpts, tmp_path):
    ckpt = ckpts[0]
    out = str(tmp_path / 'rec')
    reconstruct.main(['--ckpt', ckpt, '--data', synth['eval'], '--out', out, '--num_clips', '2',
                      '--num_workers', '0'])
    pixels = assert_png(os.path.join(out, 'reconstruction.png'),
                        reconstruct.reconstruct_size(ModelConfig(**TINY), 2))
    assert (pixels == reconstruct.MASK_GREY).all(axis=-1).any()  # masked patches are drawn grey
    with pytest.raises(ValueError, match='decoder'):
        reconstruct.main(['--ckpt', ckpt, '--weights', 'teacher', '--data', synth['eval'],
                          '--out', out, '--num_workers', '0'])


def test_embed_writes_pca_plot(synth, ckpts, tmp_path):
    out = str(tmp_path / 'embed.png')
    embed.main(['--ckpt', ckpts[0], '--data', synth['eval'], '--label_csv', synth['labels'],
                '--out', out, '--size', '400', '--num_workers', '0'])
    pixels = assert_png(out, (400, 400))
    for k in range(NUM_CLASSES):  # every class colour is drawn
        assert (pixels == class_colour(k)).all(axis=-1).any()


def test_pick_frame_is_the_middle_or_the_asked_one_and_checks_the_range():
    from scripts.plot import pick_frame
    assert pick_frame(None, 16) == 8 and pick_frame(0, 16) == 0 and pick_frame(15, 16) == 15
    for bad in (-1, 16):
        with pytest.raises(ValueError, match=r'--frame .* outside 0\.\.15'):
            pick_frame(bad, 16)
