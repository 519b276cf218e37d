"""scripts/localize.py: the pictures, the Flickr-SoundNet / VGG-SS metrics (cIoU, AUC, pointing
game) in the benchmarks' geometry (whole frame resized) with consensus-weighted masks, and DenseAV's
ADE20K-Sound metrics (pixel AP, mIoU), against hand-computed cases and independent
re-computations."""
import dataclasses
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

import data
from model import CAVMAESync, ModelConfig, make_teacher
from scripts import localize
from scripts.synth import make_synthetic

TINY = dict(audio_length=64, img_size=32, embed_dim=64, num_heads=4, modality_depth=1,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_registers=2)

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """40 clips of 4 classes (32 train, 8 eval) with object masks, frames at the tiny model size."""
    out = str(tmp_path_factory.mktemp('synth'))
    make_synthetic(out, num_clips=40, seed=0, num_classes=4, frame_size=32)
    return dict(dir=out, train=os.path.join(out, 'train.json'), eval=os.path.join(out, 'eval.json'),
                labels=os.path.join(out, 'labels.csv'))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """A train.py-style checkpoint of a tiny random model (untrained: the metrics are checked)."""
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    model = CAVMAESync(config)
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    torch.save(dict(model=model.state_dict(), teacher=make_teacher(model).state_dict(),
                    model_args=dataclasses.asdict(config), config={}, iter_num=0, epoch=0), path)
    return path


def png(path):
    with Image.open(path) as img:
        assert img.format == 'PNG'
        return np.asarray(img.convert('RGB'))


def capture_maps(monkeypatch):
    """Records every map localization_map returns (the scored maps, in scoring order)."""
    maps, original = [], localize.localization_map
    monkeypatch.setattr(localize, 'localization_map',
                        lambda *a: maps.append(original(*a)) or maps[-1])
    return maps


# --- cIoU, AUC, pointing: hand cases -----------------------------------------------------------

def test_ciou_hand_cases():
    heat = torch.arange(16.0).view(4, 4)  # ranks 8..15 (the two bottom rows) are predicted
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[2:, :2] = True  # 4 pixels, all predicted; 4 predicted pixels lie outside
    assert localize.ciou(heat, gt) == pytest.approx(4 / (4 + 4))
    gt_half = torch.zeros(4, 4, dtype=torch.bool)
    gt_half[2:] = True
    assert localize.ciou(heat, gt_half) == pytest.approx(1.0)
    assert localize.ciou(-heat, gt_half) == pytest.approx(0.0)
    weights = torch.zeros(4, 4)  # LVS consensus weights: 1 where two annotators agree, 0.5 for one
    # predicted on it: 2 x 1.0; gt total 2.5; 6 predicted pixels off it
    weights[3, :2], weights[0, 0] = 1.0, 0.5
    assert localize.ciou(heat, weights) == pytest.approx(2.0 / (2.5 + 6))
    assert localize.ciou(torch.ones(4, 4),
                         gt) == pytest.approx(4 / 16)  # a flat map predicts every pixel


def test_ciou_top_share():
    heat = torch.arange(16.0).view(4, 4)
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[3, 2:] = True  # the two highest values
    assert localize.ciou(heat, gt) == pytest.approx(2 / 8)  # top half: 8 pixels predicted
    assert localize.ciou(heat, gt,
                         top=2 / 16) == pytest.approx(1.0)  # the top 2 pixels: exactly the object
    assert localize.ciou(heat, gt, top=4 / 16) == pytest.approx(2 / 4)


def test_centre_prior_and_pointing_hand_cases():
    prior = localize.centre_prior(5, 5)
    # distances from the centre of a 5x5 grid: 0 (1 px), 1 (4), sqrt2 (4), 2 (4), sqrt5 (8), sqrt8
    # (4); the value of rank 12 (ascending) is distance 2, so the 13 pixels within distance 2 are
    # predicted
    centre = torch.zeros(5, 5, dtype=torch.bool)
    centre[2, 2] = True
    assert localize.ciou(prior, centre) == pytest.approx(1 / 13)
    assert localize.pointing_hit(prior, centre)
    corner = torch.zeros(5, 5, dtype=torch.bool)
    corner[0, 0] = True
    assert not localize.pointing_hit(prior, corner) and localize.ciou(prior, corner) == 0.0
    heat = torch.zeros(3, 4)
    heat[1, 2] = 5.0
    gt = torch.zeros(3, 4, dtype=torch.bool)
    gt[1, 2] = True
    assert localize.pointing_hit(heat, gt) and not localize.pointing_hit(heat, ~gt)


def test_localization_summary_hand_case():
    # success(thr) = share of cIoU >= thr on 0, 0.05, ..., 1: 1 up to 0.1, 0.75 up to 0.5, 0.5 up to
    # 0.7, 0.25 up to 0.95, 0 at 1; trapezoids of width 0.05 sum to 11.75 x 0.05 = 0.5875
    out = localize.localization_summary([0.12, 0.52, 0.73, 0.98], [True, False, True, True])
    assert out['cIoU@0.5'] == pytest.approx(75.0)
    assert out['AUC'] == pytest.approx(58.75)
    assert out['mean cIoU'] == pytest.approx(100 * (0.12 + 0.52 + 0.73 + 0.98) / 4)
    assert out['pointing'] == pytest.approx(75.0) and out['frames'] == 4


def reference_ciou(heat, gt):
    """numpy, written out from the LVS / EZ-VSL evaluation: normalise, median threshold, cIoU."""
    heat = heat.astype(np.float64)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    thr = np.sort(heat.flatten())[int(heat.shape[0] * heat.shape[1] * 0.5)]
    pred = (heat >= thr).astype(np.float64)
    gt = gt.astype(np.float64)
    return np.sum(pred * gt) / (np.sum(gt) + np.sum(pred * (gt == 0)))


# --- the batched path against per-frame references ---------------------------------------------

def test_localization_scores_match_per_frame_reference(synth, ckpt, monkeypatch):
    """The metrics are the reference's on the very maps the batched path scored, and those maps
    equal a per-frame recomputation to float tolerance. (Scoring the recomputed map instead would
    compare two forward orders at a median threshold: a bilinear upsampling of a 2x2 map has many
    exactly tied values there, so one ulp moves pixels across it.) The synthetic masks are 0 / 255:
    read as weights they are 0 / 1, so the metrics are the binary masks' as before."""
    model = localize.load_model(ckpt)
    ds = localize.MaskedClips(data.AVDataset(synth['eval'], mode='eval', audio_length=64, img_size=32))
    maps = capture_maps(monkeypatch)
    scores = localize.localization_scores(model, ds, batch_size=3)
    heats = torch.cat(maps)  # (frames, H, W) in the order of per_frame
    meta = json.load(open(os.path.join(synth['dir'], 'synth_meta.json')))
    expected = [(item['id'], t) for item in (ds[i] for i in range(len(ds))) for t in range(16)
                if meta[item['id']]['on'][t]]
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
            assert set(np.unique(gt)) <= {0.0, 1.0}
            c = reference_ciou(heat.numpy(), gt > 0)
            assert row['model']['cIoU'] == pytest.approx(c, abs=1e-12)
            cious.append(c)
            hits.append(bool(gt.flatten()[heat.numpy().flatten().argmax()]))
    assert scores['model']['cIoU@0.5'] == pytest.approx(100 * np.mean(np.array(cious) >= 0.5))
    assert scores['model']['pointing'] == pytest.approx(100 * np.mean(hits))


def test_localize_cli_runs_without_autograd_and_writes_metrics(synth, ckpt, tmp_path, monkeypatch,
                                                               capsys):
    grad_states = []
    original = CAVMAESync.forward_features

    def spy(self, *args, **kwargs):
        grad_states.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CAVMAESync, 'forward_features', spy)
    out = str(tmp_path / 'loc')
    localize.main(['--ckpt', ckpt, '--data', synth['eval'], '--label_csv', synth['labels'], '--out',
                   out,
                   '--num_clips', '2', '--num_workers', '0', '--batch_size', '2'])
    assert grad_states and not any(grad_states)  # pictures and metrics: no autograd graph
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert set(metrics['ezvsl']) >= {'model', 'centre prior', 'skipped', 'per_frame'}
    assert set(metrics['denseav']['model']) >= {'mAP', 'mIoU', 'classes', 'per_class'}
    printed = capsys.readouterr().out
    split = printed.index('ADE20K-Sound protocol')
    ezvsl = printed[printed.index('Flickr-SoundNet / VGG-SS protocol'):split]
    denseav = printed[split:]
    for name in ('model', 'centre prior'):
        line = next(l for l in ezvsl.splitlines() if l.startswith(name))
        s = metrics['ezvsl'][name]
        assert line.split()[-4:] == [f"{s[k]:.1f}" for k in ('cIoU@0.5', 'AUC', 'mean cIoU',
                                                             'pointing')]
        line = next(l for l in denseav.splitlines() if l.startswith(name))
        assert line.split()[-2:] == [f"{metrics['denseav'][name][k]:.1f}" for k in ('mAP', 'mIoU')]
    assert metrics['denseav']['model']['classes'] == 4  # pooled per class of the label CSV
    assert len([f for f in os.listdir(out) if f.endswith('.png')]) == 2


def test_localize_writes_heat_maps(synth, ckpt, tmp_path):
    out = str(tmp_path / 'loc')
    localize.main(['--ckpt', ckpt, '--data', synth['eval'], '--out', out, '--num_clips', '3',
                   '--num_workers', '0', '--batch_size', '2', '--protocols', 'ezvsl'])
    files = sorted(f for f in os.listdir(out) if f.endswith('.png'))
    assert len(files) == 3  # and, as the synthetic clips have masks, metrics:
    assert os.path.isfile(os.path.join(out, 'metrics.json'))
    s = localize.localize_scale(32, 32)
    assert s * 32 >= 224
    for name in files:
        with Image.open(os.path.join(out, name)) as img:
            assert img.size == (2 * 32 * s, 32 * s)
        pixels = png(os.path.join(out, name))
        assert pixels.std() > 5
        # the overlay changed the frame
        assert np.abs(pixels[:, :32 * s].astype(int) - pixels[:, 32 * s:]).mean() > 5


def test_localize_draws_the_mask_outline(synth, ckpt, tmp_path):
    model = localize.load_model(ckpt)
    ds = localize.MaskedClips(data.AVDataset(synth['eval'], mode='eval', audio_length=64, img_size=32))
    meta = json.load(open(os.path.join(synth['dir'], 'synth_meta.json')))
    clip = next(i for i in range(len(ds)) if meta[ds.clips[i]['id']]['on'][8])  # object in frame 8
    sub = torch.utils.data.Subset(ds, [clip])
    path = localize.localize(model, sub, str(tmp_path), frame=8, num_clips=1)[0]
    pixels = png(path)
    s = localize.localize_scale(32, 32)
    outline = localize.mask_outline(ds[clip]['mask'][8]).numpy()
    overlay = pixels[s // 2::s, 32 * s + s // 2::s][:32, :32]  # the middle of each source pixel
    assert outline.any() and (overlay[outline] > 200).all()


# --- the benchmarks' geometry and consensus masks ----------------------------------------------

@pytest.fixture(scope='module')
def wide_clip(tmp_path_factory):
    """One clip of 16:9 frames (64 x 36) whose object lies left of the centre crop (a 36 x 36 square
    from column 14): red on columns 0-5, its mask 255 there (both annotators) and 128 on columns
    6-11 (one of two)."""
    out = tmp_path_factory.mktemp('wide')
    rng = np.random.default_rng(0)
    os.makedirs(out / 'audio')
    sf.write(str(out / 'audio' / 'wide.wav'),
             0.1 * rng.standard_normal(16000 * 2).astype(np.float32), 16000)
    frame = np.full((36, 64, 3), 90, dtype=np.uint8)
    frame[:, :6] = (230, 20, 20)
    mask = np.zeros((36, 64), dtype=np.uint8)
    mask[:, :6], mask[:, 6:12] = 255, 128
    for i in range(2):
        os.makedirs(out / f'frame_{i}')
        os.makedirs(out / f'mask_{i}')
        Image.fromarray(frame).save(out / f'frame_{i}' / 'wide.jpg', quality=95, subsampling=0)
        Image.fromarray(mask).save(out / f'mask_{i}' / 'wide.png')
    with open(out / 'data.json', 'w') as f:
        clip = dict(video_id='wide', wav='audio/wide.wav', video_path='.', labels='')
        json.dump({'data': [clip]}, f)
    # nearest-neighbour 64 x 36 -> 32 x 32: output column j reads source column 2 j + 1, every row a
    # source row
    expected = np.zeros((32, 32))
    expected[:, :3], expected[:, 3:6] = 1.0, np.float32(128 / 255)  # the 8-bit level, in float32
    return dict(json=str(out / 'data.json'), expected=expected)


def test_full_frame_geometry_keeps_an_object_outside_the_centre_crop(wide_clip):
    config = ModelConfig(**TINY)
    full = localize.localization_dataset(wide_clip['json'], config, 2, 'full')[0]
    np.testing.assert_allclose(full['mask'][0].numpy(), wide_clip['expected'], atol=1e-7)
    std, mean = (torch.tensor(x)[:, None, None] for x in (data.IMAGE_STD, data.IMAGE_MEAN))
    rgb = full['image'][0] * std + mean  # (3, H, W) in [0, 1]
    assert (rgb[0, :, :2] > 0.8).all() and (rgb[0, :, 5:] < 0.5).all()  # the red object on the left
    crop = localize.localization_dataset(wide_clip['json'], config, 2,
                                         'crop')[0]  # the training geometry
    # the crop cut the object and its mask
    assert crop['mask'].sum() == 0 and (crop['image'][:, 0] < 0).all()
    with pytest.raises(ValueError, match='geometry'):
        data.AVDataset(wide_clip['json'], mode='train', audio_length=64, img_size=32,
                       geometry='full')


def test_ezvsl_scores_use_the_whole_frame_and_the_consensus_weights(wide_clip, ckpt, monkeypatch):
    """The model's and the centre prior's cIoU equal the reference's against the full-frame
    consensus mask (weights 1 and 128/255): on the centre crop the frame would have no object,
    binarised the weights 1."""
    model = localize.load_model(ckpt)
    ds = localize.localization_dataset(wide_clip['json'], model.config, 2, 'full')
    maps = capture_maps(monkeypatch)
    scores = localize.localization_scores(model, ds, batch_size=1)
    assert [(r['id'], r['frame']) for r in scores['per_frame']] == [('wide', 0), ('wide', 1)]
    y, x = np.mgrid[:32, :32] - 15.5
    prior = -np.sqrt(x ** 2 + y ** 2)
    for row, heat in zip(scores['per_frame'], torch.cat(maps)):
        ref_model = reference_ciou(heat.numpy(), wide_clip['expected'])
        assert row['model']['cIoU'] == pytest.approx(ref_model, abs=1e-12)
        ref_prior = reference_ciou(prior, wide_clip['expected'])
        assert row['centre prior']['cIoU'] == pytest.approx(ref_prior, abs=1e-12)
    binary = reference_ciou(prior, wide_clip['expected'] > 0)
    assert abs(scores['centre prior']['mean cIoU'] - 100 * binary) > 1  # the weights count


# --- DenseAV: pixel AP and mIoU ----------------------------------------------------------------

def loop_average_precision(scores, targets):
    """sum over thresholds t (each distinct score, high to low) of (R(t) - R(previous t)) P(t), with
    P(t), R(t) of the pixels scoring >= t: a plain loop."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = float((pred & targets).sum())
        recall = tp / float(targets.sum())
        ap += (recall - prev_recall) * tp / float(pred.sum())
        prev_recall = recall
    return ap


@pytest.mark.parametrize('tied', [False, True])
def test_pixel_average_precision_matches_a_threshold_loop(tied):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(500, generator=g)
    if tied:
        scores = (scores * 7).floor()  # 7 distinct values: long runs of tied pixels
    targets = torch.rand(500, generator=g) < 0.2 + 0.5 * (scores / scores.max())
    got = localize.pixel_average_precision(scores, targets)
    assert got == pytest.approx(loop_average_precision(scores.numpy(), targets.numpy()), abs=1e-12)
    assert localize.pixel_average_precision(targets.float(), targets) == pytest.approx(1.0)


def test_pixel_average_precision_matches_sklearn():
    metrics = pytest.importorskip('sklearn.metrics')
    g = torch.Generator().manual_seed(1)
    scores = (torch.rand(2000, generator=g) * 20).floor()
    targets = torch.rand(2000, generator=g) < 0.3
    assert localize.pixel_average_precision(scores, targets) == pytest.approx(
        metrics.average_precision_score(targets.numpy(), scores.numpy()), abs=1e-12)


@pytest.mark.parametrize('tied', [False, True])
def test_best_threshold_iou_matches_denseavs_definition(tied):
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(40, 40, generator=g)
    targets = torch.rand(40, 40, generator=g) < scores
    if tied:  # integer scores 0..19: the 20 thresholds fall exactly on them (strictly above counts)
        scores = (scores * 20).floor()
    s, t = scores.numpy().flatten(), targets.numpy().flatten()
    ious = []
    for thr in np.linspace(s.min(), s.max(), 20,
                           dtype=np.float32):  # torch.linspace over float32 scores
        pred = s > thr
        union = np.logical_or(pred, t).sum()
        ious.append(np.logical_and(pred, t).sum() / union if union else 0.0)
    assert localize.best_threshold_iou(scores, targets) == pytest.approx(max(ious), abs=1e-12)
    assert localize.best_threshold_iou(scores, torch.zeros_like(targets)) == 0.0  # no target: IoU 0


def reference_pooled_ap(heat, gt):
    """AP as the mean over positive pixels of the precision among the pixels scoring >= them."""
    order = np.sort(heat)
    above = len(heat) - np.searchsorted(order, heat[gt],
                                        side='left')  # pixels >= each positive's score
    pos_sorted = np.sort(heat[gt])
    pos_above = len(pos_sorted) - np.searchsorted(pos_sorted, heat[gt], side='left')
    return float(np.mean(pos_above / above))


def test_denseav_scores_pool_the_frames_of_each_class(synth, ckpt, monkeypatch):
    """mAP / mIoU = the mean over classes of the pooled AP / best IoU of that class's frames (the
    clip's label), on the maps the path scored; the centre prior pools one map per frame."""
    model = localize.load_model(ckpt)
    ds = localize.localization_dataset(synth['eval'], model.config, 16, 'crop', synth['labels'])
    maps = capture_maps(monkeypatch)
    scores = localize.denseav_scores(model, ds, batch_size=3)
    heats = torch.cat(maps)
    frames = [(i, t) for i in range(len(ds)) for t in range(16) if ds[i]['mask'][t].any()]
    assert len(frames) == len(heats) == scores['model']['frames']
    by_class = {}
    for (i, t), heat in zip(frames, heats):
        item = ds[i]
        frames_of = by_class.setdefault(int(item['label'].argmax()), [])
        frames_of.append((heat.numpy(), item['mask'][t].numpy() > 0.5))
    aps = [reference_pooled_ap(np.concatenate([h.flatten() for h, _ in v]).astype(np.float64),
                               np.concatenate([m.flatten() for _, m in v]))
           for v in by_class.values()]
    assert scores['model']['classes'] == len(by_class) == 4
    assert scores['model']['mAP'] == pytest.approx(100 * np.mean(aps), abs=1e-9)
    for c, v in by_class.items():
        heat = torch.from_numpy(np.stack([h for h, _ in v]))
        gt = torch.from_numpy(np.stack([m for _, m in v]))
        assert scores['model']['per_class'][str(c)]['IoU'] == pytest.approx(
            100 * localize.best_threshold_iou(heat, gt), abs=1e-9)


def test_dtype_comes_from_the_command_line(synth, ckpt, tmp_path, monkeypatch):
    """The maps run under model.autocast(device, --dtype); float32 by default on a CPU."""
    seen, autocast = [], localize.autocast
    monkeypatch.setattr(localize, 'autocast',
                        lambda device, dtype: seen.append(dtype) or autocast(device, dtype))
    for extra, expected in (([], 'float32'), (['--dtype', 'bfloat16'], 'bfloat16')):
        localize.main(['--ckpt', ckpt, '--data', synth['eval'], '--out', str(tmp_path / expected),
                       '--num_clips', '1', '--metrics_clips', '1', '--num_workers', '0'] + extra)
        assert seen and set(seen) == {expected}
        seen.clear()
