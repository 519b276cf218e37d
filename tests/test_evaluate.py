"""evaluate.py: retrieval scoring and metrics against slow references, mAP (CAV-MAE's number), the probe
and its two augmentations, checkpoint loading, feature extraction (precision from the caller) and caching,
on a tiny synthetic set (files and shards)."""
import dataclasses
import json
import math
import os
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
from evaluate import STRATEGIES, extract_features, load_model, retrieval, retrieval_metrics, similarity, train_probe
from model import CAVMAESync, ModelConfig, make_teacher
from scripts.shard import write_shards
from scripts.synth import make_synthetic

TINY = dict(audio_length=64, img_size=32, embed_dim=64, num_heads=4, modality_depth=1, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=4, num_registers=2)
NUM_CLASSES = 5
ALL_THREADS = torch.get_num_threads()  # the benchmark uses them all; the other tests one


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """100 synthetic clips of 5 classes (80 train, 20 eval), frames already at the tiny model's size."""
    out = str(tmp_path_factory.mktemp('synth'))
    make_synthetic(out, num_clips=100, seed=0, num_classes=NUM_CLASSES, frame_size=32)
    return dict(train=os.path.join(out, 'train.json'), eval=os.path.join(out, 'eval.json'),
                labels=os.path.join(out, 'labels.csv'))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """A train.py-style checkpoint of a tiny random model (student and EMA teacher)."""
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    model = CAVMAESync(config)
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    torch.save(dict(model=model.state_dict(), teacher=make_teacher(model).state_dict(),
                    model_args=dataclasses.asdict(config), config=dict(batch_size=2), iter_num=7, epoch=0), path)
    return path


@pytest.fixture(scope='module')
def features(synth, ckpt, tmp_path_factory):
    """Features of both splits, extracted once and cached on disk for the CLI tests: the retrieval
    embedding ('joint') and the default probe input ('global')."""
    torch.set_num_threads(1)
    cache = str(tmp_path_factory.mktemp('cache'))
    out = dict(cache=cache)
    for embedding in ('joint', 'global'):
        for split in ('train', 'eval'):
            out[embedding, split] = evaluate.features_for(ckpt, synth[split], synth['labels'],
                                                          embedding=embedding, cache=cache)
    out['eval'] = out['joint', 'eval']
    return out


# --- retrieval ------------------------------------------------------------------------------

def loop_similarity(query, candidates, strategy):
    """The straightforward version: a double loop over clip pairs, frame cosines per pair."""
    out = torch.empty(len(query), len(candidates), dtype=query.dtype)
    for i in range(len(query)):
        for j in range(len(candidates)):
            if strategy.startswith('diag'):
                cos = F.cosine_similarity(query[i], candidates[j], dim=-1)  # (T,)
            else:
                cos = F.cosine_similarity(query[i][:, None], candidates[j][None], dim=-1)  # (T, T)
            out[i, j] = cos.mean() if strategy.endswith('mean') else cos.max()
    return out


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_similarity_matches_double_loop(strategy):
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(7, 4, 8, generator=g) * 3, torch.randn(5, 4, 8, generator=g)  # not normalised
    expected = loop_similarity(q.double(), c.double(), strategy)
    assert torch.allclose(similarity(q, c, strategy).double(), expected, atol=1e-5)
    # chunked over queries (the max strategies), and symmetric
    assert torch.allclose(similarity(q, c, strategy, max_elements=40).double(), expected, atol=1e-5)
    assert torch.allclose(similarity(c, q, strategy).T, similarity(q, c, strategy), atol=1e-6)


def brute_force_metrics(sim):
    """Per query: sort candidates by score, ties broken against the true match; rank = its position."""
    n, ranks = len(sim), []
    for i in range(n):
        order = sorted(range(n), key=lambda j: (-sim[i][j], j == i))
        ranks.append(order.index(i) + 1)
    out = {f'R@{k}': 100.0 * sum(r <= k for r in ranks) / n for k in (1, 5, 10)}
    out['MedR'] = statistics.median(ranks)
    return out


@pytest.mark.parametrize('kind', ['random', 'tied', 'odd'])
def test_retrieval_metrics_match_brute_force(kind):
    g = torch.Generator().manual_seed(2)
    n = 41 if kind == 'odd' else 40
    sim = torch.randn(n, n, generator=g)
    if kind == 'tied':  # few distinct scores: many queries tie with their true match
        sim = torch.randint(0, 3, (n, n), generator=g).float()
        sim[:5, :] = 1.0  # whole rows tied: the true match ranks last
    sim += 2.0 * torch.eye(n) * (torch.rand(n, generator=g) < 0.3)[:, None] * (kind != 'tied')
    got, expected = retrieval_metrics(sim), brute_force_metrics(sim.tolist())
    assert got == pytest.approx(expected)
    if kind == 'tied':
        assert retrieval_metrics(torch.ones(n, n)) == {'R@1': 0.0, 'R@5': 0.0, 'R@10': 0.0, 'MedR': n}


def test_retrieval_perfect_and_chance():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(300, 4, 32, generator=g)
    perfect = retrieval(dict(g_a=emb, g_v=emb + 0.01 * torch.randn(emb.shape, generator=g)), STRATEGIES)
    for strategy in STRATEGIES:
        for direction in ('V->A', 'A->V'):
            assert perfect[strategy][direction]['R@1'] == 100.0 and perfect[strategy][direction]['MedR'] == 1
    n = 1000
    chance = retrieval(dict(g_a=torch.randn(n, 4, 32, generator=g), g_v=torch.randn(n, 4, 32, generator=g)))
    for m in chance['diag_mean'].values():  # chance: R@k = k/n, median rank n/2
        assert m['R@1'] < 1.0 and m['R@10'] < 3.0 and 0.4 * n < m['MedR'] < 0.6 * n


def test_retrieval_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match='square'):
        retrieval_metrics(torch.zeros(3, 4))
    with pytest.raises(ValueError, match='NaN'):
        retrieval_metrics(torch.full((3, 3), float('nan')))
    with pytest.raises(ValueError, match='unknown strategy'):
        similarity(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 'mean')


def test_scoring_benchmark_vs_double_loop(capsys):
    """Prints the time to score the VGGSound retrieval split's size against a double loop."""
    torch.set_num_threads(ALL_THREADS)
    N, T, D, n_loop = 1545, 16, 768, 100
    g = torch.Generator().manual_seed(4)
    q, c = torch.randn(N, T, D, generator=g), torch.randn(N, T, D, generator=g)
    similarity(q[:64], c[:64])  # warm-up

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_fast = best_of(lambda: similarity(q, c, 'diag_mean'))
    a, b = q.reshape(N, T * D), c.reshape(N, T * D)
    t_matmul = best_of(lambda: a @ b.T)
    t_loop = best_of(lambda: loop_similarity(q[:n_loop], c[:n_loop], 'diag_mean'), repeats=1)
    per_pair_fast, per_pair_loop = t_fast / N ** 2, t_loop / n_loop ** 2
    with capsys.disabled():
        print(f'\n[benchmark] diag_mean scoring, {N} clips x {T} frames x {D}-d, CPU, {torch.get_num_threads()} threads: '
              f'{t_fast:.3f} s; one ({N} x {T * D}) @ ({T * D} x {N}) matmul: {t_matmul:.3f} s '
              f'(ratio {t_fast / t_matmul:.2f})')
        print(f'[benchmark] double loop over pairs, {n_loop}-clip subset: {t_loop:.3f} s = '
              f'{per_pair_loop * 1e6:.1f} us/pair vs {per_pair_fast * 1e6:.3f} us/pair batched: '
              f'{per_pair_loop / per_pair_fast:.0f}x faster per pair '
              f'(the loop would need ~{per_pair_loop * N ** 2:.0f} s for all {N} clips)')
    assert per_pair_loop / per_pair_fast > 10


# --- mAP and the probe ------------------------------------------------------------------------

def slow_ap_walk(scores, targets):
    """Sort by score, walk down the list: precision at each positive, averaged (float64)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if targets[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def slow_ap_threshold(scores, targets):
    """Precision among everything scoring >= each positive's score, averaged (handles ties)."""
    precisions = []
    for i, s in enumerate(scores):
        if targets[i]:
            above = [j for j in range(len(scores)) if scores[j] >= s]
            precisions.append(sum(targets[j] for j in above) / len(above))
    return sum(precisions) / len(precisions)


def mean_average_precision(scores, targets):
    """probe_metric's mAP; the sigmoid keeps the ranking and the ties of scores, so they serve as logits."""
    return evaluate.probe_metric(scores, targets, multilabel=True)


@pytest.mark.parametrize('tied', [False, True])
def test_mean_average_precision_matches_slow_reference(tied):
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(60, 7, generator=g, dtype=torch.float64)
    if tied:
        scores = (scores * 4).floor()
    targets = (torch.rand(60, 7, generator=g) < 0.3).float()
    reference = slow_ap_threshold if tied else slow_ap_walk
    aps = [reference(scores[:, k].tolist(), targets[:, k].tolist()) for k in range(7)]
    assert mean_average_precision(scores, targets) == pytest.approx(100 * sum(aps) / 7, abs=1e-9)
    with pytest.raises(ValueError, match='no class'):
        mean_average_precision(scores, torch.zeros_like(scores))


def stats_py_map(scores, targets):
    """CAV-MAE's stats.py: np.mean over every class of sklearn's average_precision_score, restated:
    the step-wise area under the precision-recall curve over the distinct score thresholds, with recall
    set to 1 at every threshold when a class has no positive (so its AP is 0)."""
    aps = []
    for k in range(targets.shape[1]):
        s, y = scores[:, k].tolist(), [t > 0 for t in targets[:, k].tolist()]
        thresholds = sorted(set(s), reverse=True)
        prev_recall, ap = 0.0, 0.0
        for th in thresholds:
            above = [yi for si, yi in zip(s, y) if si >= th]
            recall = sum(above) / sum(y) if any(y) else 1.0
            ap += (recall - prev_recall) * (sum(above) / len(above))
            prev_recall = recall
        aps.append(ap if any(y) else 0.0)
    return 100 * sum(aps) / len(aps)


def test_mean_average_precision_counts_classes_without_positives_as_the_release():
    """An eval set where 3 of 12 classes have no positive (a partial download): the release's number
    (every class in the mean, an empty one as 0), not the mean over the classes present."""
    g = torch.Generator().manual_seed(8)
    scores = (torch.rand(80, 12, generator=g, dtype=torch.float64) * 6).floor()  # ties too
    targets = (torch.rand(80, 12, generator=g) < 0.25).float()
    targets[:, [1, 6, 9]] = 0
    present = evaluate.average_precisions(scores, targets)[targets.any(0)].mean().item() * 100
    got = mean_average_precision(scores, targets)
    assert got == pytest.approx(stats_py_map(scores, targets), abs=1e-9)
    assert got == pytest.approx(present * 9 / 12, abs=1e-9) and got < present - 5
    assert evaluate.average_precisions(scores, targets)[[1, 6, 9]].tolist() == [0.0, 0.0, 0.0]


def prototype_features(n, num_classes, multilabel, g, T=4, dim=16):
    """Frame vectors = sum of the clip's class prototypes + noise."""
    protos = torch.randn(num_classes, dim, generator=g)
    if multilabel:
        y = (torch.rand(n, num_classes, generator=g) < 0.3).float()
    else:
        y = F.one_hot(torch.randint(0, num_classes, (n,), generator=g), num_classes).float()
    x = (y @ protos)[:, None] + 1.0 * torch.randn(n, T, dim, generator=g)
    return x, y


@pytest.mark.parametrize('multilabel', [False, True])
def test_probe_learns_separable_features(multilabel):
    g = torch.Generator().manual_seed(6)
    x, y = prototype_features(240, 6, multilabel, g)
    out = train_probe(x[:160], y[:160], x[160:], y[160:], multilabel, lr=1e-3, epochs=15, batch_size=16,
                      num_heads=4, wa_start=8)
    chance = 100 / 6 if not multilabel else mean_average_precision(torch.rand(80, 6, generator=g), y[160:])
    print(f"probe on prototypes: {out['metric']} {out['final']:.1f} (chance {chance:.1f})")
    assert out['metric'] == ('mAP' if multilabel else 'top-1')
    assert out['final'] > chance + 40
    assert len(out['history']) == 15


def gen_weight_file_loop(label_lists, num_classes):
    """CAV-MAE's gen_weight_file.py, restated with plain loops: label_count per class, label_weight =
    1000 / (count + 0.01), a clip's weight the sum over its labels."""
    label_count = [0] * num_classes
    for labels in label_lists:
        for k in labels:
            label_count[k] += 1
    label_weight = [1000.0 / (c + 0.01) for c in label_count]
    return [sum(label_weight[k] for k in labels) for labels in label_lists]


def test_class_balanced_weights_and_sampler_match_the_release():
    g = torch.Generator().manual_seed(0)
    label_lists = [[0]] * 30 + [[1]] * 6 + [[2, 0]] * 3 + [[3]]  # imbalanced, one multi-label clip kind
    y = torch.zeros(len(label_lists), 5)
    for i, labels in enumerate(label_lists):
        y[i, labels] = 1
    w = evaluate.class_balanced_weights(y)
    assert w.tolist() == pytest.approx(gen_weight_file_loop(label_lists, 5), rel=1e-12)
    # the draws of torch's WeightedRandomSampler(weights, N, replacement=True) with the same generator state
    ref = list(torch.utils.data.WeightedRandomSampler(w.tolist(), 40, generator=torch.Generator().manual_seed(3)))
    assert evaluate.epoch_order(40, torch.Generator().manual_seed(3), w).tolist() == ref
    single = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)  # 90 / 9 / 1 %
    draws = evaluate.epoch_order(30000, g, evaluate.class_balanced_weights(F.one_hot(single).float()))
    freq = torch.bincount(single[draws], minlength=3).double() / 30000
    assert (freq - 1 / 3).abs().max() < 0.02  # classes drawn equally often
    assert sorted(evaluate.epoch_order(50, g).tolist()) == list(range(50))  # unbalanced: a permutation


def test_probe_balanced_sampling_and_schedule(monkeypatch):
    """balanced=True feeds the probe class-balanced epochs; warmup 10% of the steps, cosine to min_lr."""
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0] * 72 + [1] * 8)
    y = F.one_hot(labels, 2).float()
    x = y[:, None, :].repeat(1, 4, 8) + 0.5 * torch.randn(80, 4, 16, generator=g)
    orders = []
    order_fn = evaluate.epoch_order
    monkeypatch.setattr(evaluate, 'epoch_order', lambda *a: orders.append(order_fn(*a)) or orders[-1])
    out = train_probe(x, y, x, y, False, lr=1e-3, epochs=10, batch_size=16, num_heads=4, wa_start=5, balanced=True)
    drawn = labels[torch.cat(orders)]
    assert len(orders) == 10 and 0.4 < (drawn == 1).double().mean() < 0.6  # 10% of the clips, half the draws
    lrs = [h['lr'] for h in out['history']]  # at the end of each epoch: 5 steps per epoch, 50 in all
    assert lrs[0] == pytest.approx(1e-3)  # warmup ends with the first epoch (10%)
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-3 * 0.01
    assert lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (24 - 5) / 45)))  # step 24 of the cosine
    train_probe(x, y, x, y, False, lr=1e-3, epochs=2, batch_size=16, num_heads=4, wa_start=1)
    assert sorted(orders[-1].tolist()) == list(range(80))  # not balanced: permutations


def write_label_csv(path, mids):
    with open(path, 'w') as f:
        f.write('index,mid,display_name\n' + ''.join(f'{i},{m},class {i}\n' for i, m in enumerate(mids)))
    return str(path)


def test_label_type_comes_from_the_label_csv(shared_dir, tmp_path):
    one_label_each = torch.eye(3)  # a multi-label set whose clips carry one label each

    def multilabel(label_csv):  # --label_type auto: the task from the label CSV's ids
        return evaluate.probe_settings(label_csv, 'auto', 'no', one_label_each, one_label_each)[0]
    assert multilabel(os.path.join(shared_dir, 'data', 'class_labels_indices_as.csv')) is True
    assert multilabel(os.path.join(shared_dir, 'data', 'class_labels_indices_vgg.csv')) is False
    assert multilabel(write_label_csv(tmp_path / 'syn.csv', ['syn_0', 'syn_1'])) is False
    audioset = write_label_csv(tmp_path / 'as.csv', ['/m/09x0r', '/t/dd00004', '/g/122z_qxw'])
    assert evaluate.probe_settings(audioset, 'auto', 'auto', one_label_each, one_label_each) == (True, False)
    vgg = write_label_csv(tmp_path / 'vgg.csv', ['vgg_0', 'vgg_1', 'vgg_2'])
    assert evaluate.probe_settings(vgg, 'auto', 'auto', one_label_each, one_label_each) == (False, True)
    assert evaluate.probe_settings(vgg, 'auto', 'no', one_label_each, one_label_each) == (False, False)
    two_labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match='several labels'):
        evaluate.probe_settings(vgg, 'auto', 'no', one_label_each, two_labels)
    assert evaluate.probe_settings(vgg, 'multi', 'no', one_label_each, two_labels) == (True, False)


def test_augmented_clips_against_an_independent_pipeline(synth):
    """AugmentedClips' item = the release's recipe recomputed from the files: soundfile waveforms, mean
    removed, partner cut/padded, mixed, mean removed, rolled, kaldi fbank, the 16 aligned segments; frames and
    labels mixed with the same lambda. Draws depend on (seed, epoch, position) only."""
    import soundfile as sf
    import torchaudio
    dataset = data.AVDataset(synth['train'], synth['labels'], mode='eval', audio_length=64, num_mel_bins=128,
                             img_size=32)
    order = torch.tensor([5, 2, 9])
    clips = evaluate.AugmentedClips(dataset, order, epoch=3, seed=1, mixup=1.0)
    item = clips[1]
    rng = np.random.default_rng((1, 3, 1))
    assert rng.random() < 1.0
    partner = (2 + int(rng.integers(1, len(dataset)))) % len(dataset)  # never the clip itself
    lam = float(rng.beta(10, 10))
    shift = int(rng.integers(-data.MAX_TIME_SHIFT, data.MAX_TIME_SHIFT + 1))

    def wav(clip):
        x = torch.from_numpy(sf.read(clip['wav'], dtype='float32')[0])
        return x - x.mean()
    a, b = wav(dataset.clips[2]), wav(dataset.clips[partner])
    b = b[:len(a)] if len(b) >= len(a) else torch.cat([b, torch.zeros(len(a) - len(b))])
    mixed = lam * a + (1 - lam) * b
    mixed = torch.roll(mixed - mixed.mean(), shift)
    fbank = torchaudio.compliance.kaldi.fbank(mixed[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                              window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)
    fbank = torch.cat([fbank, torch.zeros(1024 - len(fbank), 128)])[:1024]
    for t in (0, 7, 15):
        start, end = data.segment_bounds(t, 16, 1024, 64)
        assert torch.allclose(item['audio'][t], (fbank[start:end] + 5.081) / 4.4849, atol=1e-3)
    plain, other = dataset[2], dataset[partner]
    assert torch.allclose(item['image'], lam * plain['image'] + (1 - lam) * other['image'], atol=1e-5)
    assert torch.allclose(item['label'], lam * plain['label'] + (1 - lam) * other['label'])
    assert item['id'] == plain['id'] and len(clips) == 3
    assert torch.equal(evaluate.AugmentedClips(dataset, order, 3, 1, 1.0)[1]['audio'], item['audio'])
    assert not torch.equal(evaluate.AugmentedClips(dataset, order, 4, 1, 1.0)[1]['audio'], item['audio'])
    unmixed = evaluate.AugmentedClips(dataset, order, 3, 1, 0.0)[0]
    assert torch.equal(unmixed['label'], dataset[5]['label']) and torch.equal(unmixed['image'], dataset[5]['image'])


def test_probe_cli_input_augmentation_reextracts_every_epoch(synth, ckpt, features, tmp_path, monkeypatch):
    calls = []
    extract = evaluate.extract_features

    def spy(model, dataset, *args):
        calls.append((dataset, args))
        return extract(model, dataset, *args)
    monkeypatch.setattr(evaluate, 'extract_features', spy)
    out = str(tmp_path / 'probe.json')
    evaluate.main(['probe', '--ckpt', ckpt, '--train', synth['train'], '--eval', synth['eval'], '--label_csv',
                   synth['labels'], '--cache', features['cache'], '--epochs', '2',
                   '--wa_start', '1', '--probe_batch_size', '16', '--num_workers', '0', '--out', out])
    result = json.load(open(out))
    assert result['augment'] == 'input' and result['balanced'] and len(result['history']) == 2
    assert result['probe_input'] == 'global' and result['dtype'] == 'float32'  # the defaults on a CPU
    assert [type(d).__name__ for d, _ in calls] == ['AugmentedClips'] * 2
    assert [d.epoch for d, _ in calls] == [1, 2] and all(len(d) == 80 for d, _ in calls)
    assert all(args[-2:] == ('float32', 'global') for _, args in calls)  # dtype, embedding


def test_input_augmentation_on_a_shard_set(synth, ckpt, tmp_path):
    """AugmentedClips builds its items with AVDataset's builder, so a shard set gives the items of the
    JSON it was packed from, and `probe --augment input` runs on shards."""
    shards = str(tmp_path / 'shards')
    write_shards(synth['train'], shards, shard_size=30)
    config = ModelConfig(**TINY)
    files = evaluate.make_dataset(synth['train'], synth['labels'], config)
    packed = evaluate.make_dataset(shards, synth['labels'], config)
    order = torch.tensor([3, 0, 41, 79])
    for pos in range(4):
        a = evaluate.AugmentedClips(files, order, epoch=2, seed=5, mixup=0.5)[pos]
        b = evaluate.AugmentedClips(packed, order, epoch=2, seed=5, mixup=0.5)[pos]
        assert a['id'] == b['id'] and torch.equal(a['label'], b['label'])
        assert torch.equal(a['image'], b['image']) and torch.allclose(a['audio'], b['audio'], atol=1e-5)
    out = str(tmp_path / 'probe.json')
    evaluate.main(['probe', '--ckpt', ckpt, '--train', shards, '--eval', synth['eval'], '--label_csv',
                   synth['labels'], '--augment', 'input', '--epochs', '1', '--wa_start', '1',
                   '--num_workers', '0', '--out', out])
    assert json.load(open(out))['augment'] == 'input'


def test_cached_mixup_partners_come_from_the_whole_set_never_the_clip_itself():
    """The quick option mixes every clip (mixup 1) with another training clip: one-hot features show
    the two clips in each mixed row; partners come from outside the batch too."""
    N, B = 40, 8
    x, y = torch.eye(N)[:, None, :], torch.eye(N)  # (N, 1, N): clip i's feature is e_i
    beta = torch.distributions.Beta(torch.tensor(10.0), torch.tensor(10.0))
    gen = torch.Generator().manual_seed(0)
    outside = 0
    for epoch in range(5):
        order = evaluate.epoch_order(N, gen)
        for (xb, yb), idx in zip(evaluate.mixed_cached_batches(x, y, order, B, 1.0, gen, beta),
                                 order.split(B)):
            weights = xb[:, 0]  # (B, N)
            assert torch.equal(weights, yb)
            assert ((weights > 0).sum(dim=1) == 2).all()  # itself and one other clip
            assert (weights[torch.arange(len(idx)), idx] > 0).all()  # the clip itself is one of them
            partner = (weights * (torch.arange(N) != idx[:, None])).argmax(dim=1)
            outside += int((~torch.isin(partner, idx)).sum())
    assert outside > 100  # of 200 partners: most lie outside the clip's batch


# --- loading, features, cache ---------------------------------------------------------------

def test_load_model_train_checkpoint(ckpt, tmp_path):
    saved = torch.load(ckpt, weights_only=True)
    model = load_model(ckpt)
    assert not model.training and model.has_decoder
    assert all(torch.equal(v, saved['model'][k]) for k, v in model.state_dict().items())
    teacher = load_model(ckpt, weights='teacher')
    assert not teacher.has_decoder
    assert all(torch.equal(v, saved['teacher'][k]) for k, v in teacher.state_dict().items())

    no_teacher = str(tmp_path / 'no_teacher.pt')
    torch.save({**saved, 'teacher': None}, no_teacher)
    with pytest.raises(ValueError, match='no teacher'):
        load_model(no_teacher, weights='teacher')
    for name, content in (('other.pt', {'foo': torch.zeros(1)}), ('list.pt', [torch.zeros(1)])):
        path = str(tmp_path / name)
        torch.save(content, path)
        with pytest.raises(ValueError, match=name):
            load_model(path)


def test_load_model_official_release_layout(shared_dir, tmp_path):
    """A state dict with the official keys and shapes (DataParallel 'module.' prefix) loads as the
    paper-size model, values in place."""
    sd = {}
    for line in open(os.path.join(shared_dir, 'reference', 'official_state_dict_keys.tsv')):
        key, shape = line.rstrip('\n').split('\t')
        sd['module.' + key] = torch.zeros(eval(shape))
    sd['module.cls_token_a'] = torch.randn(1, 1, 768)
    path = str(tmp_path / 'official.pth')
    torch.save(sd, path)
    del sd
    model = load_model(path)
    assert model.config == ModelConfig()
    assert torch.equal(model.cls_token_a, torch.load(path, weights_only=True)['module.cls_token_a'])
    with pytest.raises(ValueError, match='no teacher'):
        load_model(path, weights='teacher')


def test_extract_features_matches_per_frame_forward(synth, ckpt):
    model = load_model(ckpt)
    dataset = evaluate.make_dataset(synth['eval'], synth['labels'], model.config)
    subset = torch.utils.data.Subset(dataset, range(3))
    feats = extract_features(model, subset, batch_size=2)  # batches of 2 clips x 16 frames
    assert feats['g_a'].shape == (3, 16, 64) and feats['labels'].shape == (3, NUM_CLASSES)
    with torch.no_grad():
        for i in range(3):
            item = dataset[i]
            assert feats['ids'][i] == item['id'] and torch.equal(feats['labels'][i], item['label'])
            for t in (0, 7, 15):
                g_a, g_v, _, _ = model.forward_features(item['audio'][t:t + 1], item['image'][t:t + 1])
                assert torch.allclose(feats['g_a'][i, t], g_a[0], atol=1e-5)
                assert torch.allclose(feats['g_v'][i, t], g_v[0], atol=1e-5)


def test_precision_comes_from_the_caller(synth, ckpt, tmp_path, monkeypatch):
    """extract_features runs under model.autocast(device, dtype) with the caller's dtype: the command
    line's --dtype (float32 on a CPU by default); bfloat16 really changes the features."""
    model = load_model(ckpt)
    subset = torch.utils.data.Subset(evaluate.make_dataset(synth['eval'], None, model.config), range(2))
    fp32 = extract_features(model, subset, dtype='float32')
    bf16 = extract_features(model, subset, dtype='bfloat16')
    assert not torch.equal(fp32['g_a'], bf16['g_a']) and torch.allclose(fp32['g_a'], bf16['g_a'], atol=0.1)
    seen = []
    autocast = evaluate.autocast
    monkeypatch.setattr(evaluate, 'autocast', lambda device, dtype: seen.append(dtype) or autocast(device, dtype))
    for extra in ([], ['--dtype', 'bfloat16']):
        out = str(tmp_path / 'r.json')
        evaluate.main(['retrieval', '--ckpt', ckpt, '--data', synth['eval'], '--num_workers', '0',
                       '--out', out] + extra)
        assert set(seen) == {extra[-1] if extra else 'float32'} and json.load(open(out))['dtype'] == seen[0]
        seen.clear()


def test_retrieval_cli_uses_cached_features(synth, ckpt, features, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError('features were cached: the model must not be loaded')
    monkeypatch.setattr(evaluate, 'load_model', no_model)
    out = str(tmp_path / 'results.json')
    evaluate.main(['retrieval', '--ckpt', ckpt, '--data', synth['eval'], '--label_csv', synth['labels'],
                   '--cache', features['cache'], '--strategy', 'diag_mean', 'block_max', '--out', out])
    results = json.load(open(out))
    assert results['num_clips'] == 20 and results['num_frames'] == 16
    expected = retrieval(features['eval'], ('diag_mean', 'block_max'))
    for strategy in ('diag_mean', 'block_max'):
        for direction in ('V->A', 'A->V'):
            assert results['results'][strategy][direction] == pytest.approx(expected[strategy][direction])


def test_probe_cli_beats_chance_on_synthetic_clips(synth, ckpt, features, tmp_path):
    """Tiny random encoder, 80 training clips of 5 classes: clearly better than chance (20%)."""
    finals = {}
    for modality in ('av', 'a', 'v'):
        out = str(tmp_path / f'probe_{modality}.json')
        evaluate.main(['probe', '--ckpt', ckpt, '--train', synth['train'], '--eval', synth['eval'],
                       '--label_csv', synth['labels'], '--cache', features['cache'], '--modality', modality,
                       '--augment', 'cached',
                       '--epochs', '30', '--probe_batch_size', '16', '--out', out])
        result = json.load(open(out))
        assert result['metric'] == 'top-1' and len(result['history']) == 30
        finals[modality] = result['final']
    print(f'probe top-1 on synthetic clips: {finals}')
    assert finals['av'] >= 50 and finals['a'] >= 50 and finals['v'] >= 30  # the 32-px frames give 4 patches
