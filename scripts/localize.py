"""
Sound-prompted localisation: pictures and the benchmarks' metrics.

    python scripts/localize.py --ckpt out/ckpt.pt --data eval.json --out loc/ [--metrics_clips N]
    python scripts/localize.py --ckpt C --data ade.json --label_csv labels.csv --out loc/ \
        --protocols denseav

The map of a frame is the cosine between g_a of its audio segment and every visual patch token of
the frame, bilinearly upsampled to the frame. Pictures: for frame --frame (the middle one by
default) of the first --num_clips clips, OUT/<id>.png = [frame | map min-max scaled and overlaid
(red = most similar)], small frames enlarged to at least 224 px; where the dataset has object masks
their outline is drawn in white. Pictures and the box metrics use the whole frame resized to the
model's size.

Metrics, with object masks ({video_path}/mask_{i}/{video_id}.png, 8-bit PNGs the size of the frame:
grey level / 255 = the ground-truth weight, 0 = background; every frame with a non-empty mask is
scored), for the model's map and for a centre prior (minus the distance to the centre), each
protocol in its benchmark's geometry:

  ezvsl    Flickr-SoundNet / VGG-SS as the LVS (Chen et al., CVPR 2021) and EZ-VSL (Mo & Morgado,
           ECCV 2022) evaluation code: the whole frame and its mask resized to img_size x img_size
           (no crop: boxes stay in full-frame coordinates); a weighted mask holds Flickr's annotator
           consensus (sum of boxes / 2, clipped at 1: grey 128 = one annotator of two). The map is
           min-max normalised, its top half (values at or above the median) is the prediction P;
           cIoU = sum(P * G) / (sum(G) + |P without G|). cIoU@0.5 = share of frames with cIoU >= 0.5
           (the papers' "cIoU" / AP50), AUC = area under that share over thresholds 0, 0.05, ..., 1
           (trapezoids), the mean cIoU, and the pointing game (the map's maximum on the object; not
           in that code, no tolerance). --top 0.1 predicts the top 10% instead (then say so).
  denseav  ADE20K-Sound as DenseAV's evaluation (Hamilton et al., CVPR 2024, eval_utils.py; the
           metric CAV-MAE Sync reports): frame and mask with the shorter side resized to img_size
           and the centre crop (its label transform); the raw maps of all frames of a class (the
           clip's first label with --label_csv, else one class) pooled: pixel average precision (AP
           against mask > 0.5, ties as sklearn's average_precision_score) and the best IoU over 20
           thresholds evenly spaced from the pooled maps' minimum to maximum (prediction >
           threshold); each averaged over the classes: mAP and mIoU (percent). Memory: 5 bytes per
           scored pixel.

With G inside P, cIoU = sum(G) / |P|: it cannot exceed the object's share of the frame / 0.5. The
synthetic objects cover 5-15% of the frame, so cIoU@0.5 is 0 for any map at the benchmark setting;
there the pointing game, the mean cIoU against the centre prior and the DenseAV numbers are the
telling ones. The tables are printed and written to OUT/metrics.json with per-frame and per-class
values.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
from evaluate import load_model, print_table
from model import autocast
from scripts.plot import (TURBO, add_model_args, colormap, frame_to_rgb, parse_model_args,
                          pick_frame, safe_name, unit_range)

PROTOCOLS = ('ezvsl', 'denseav')
GEOMETRY = {'ezvsl': 'full',
            'denseav': 'crop'}  # data.load_frame: whole frame resized / centre crop
AUC_THRESHOLDS = [0.05 * i for i in range(21)]


def mask_path(video_path, i, clip_id):
    """Object mask of frame i: an 8-bit PNG the size of the frame, grey level / 255 = weight."""
    return os.path.join(video_path, f'mask_{i}', f'{clip_id}.png')


def load_mask(path, img_size, clip_id='', geometry='crop'):
    """Mask PNG -> (img_size, img_size) float32 weights in [0, 1] (grey level / 255: a binary mask
    gives 0 / 1, Flickr's annotator consensus 0.5 / 1) in data.load_frame's geometry
    (nearest-neighbour: no new grey levels)."""
    try:
        with Image.open(path) as img:
            img = img.convert('L')
    except Exception as e:
        raise data.ClipError(f"clip '{clip_id}': cannot read mask file {path}: {e}") from e
    img = data.fit_frame(img, img_size, Image.NEAREST, geometry)
    return torch.from_numpy(np.array(img)).float().div_(255.0)


class MaskedClips(torch.utils.data.Dataset):
    """An eval-mode data.AVDataset of a JSON, its items with mask (T, H, W) (load_mask in the
    dataset's geometry; 0 where a frame has no mask file) and has_mask (T,) bool."""

    def __init__(self, dataset):
        if dataset.mode != 'eval' or 'video_path' not in dataset.clips[0]:
            raise ValueError('object masks need an eval-mode dataset of a JSON (shards have none)')
        self.dataset, self.clips = dataset, dataset.clips

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        ds, clip = self.dataset, self.clips[index]
        item = ds[index]
        paths = [mask_path(clip['video_path'], i, clip['id']) for i in range(ds.num_frames)]
        has = torch.tensor([os.path.isfile(p) for p in paths])  # (T,)
        empty = torch.zeros(ds.img_size, ds.img_size)
        mask = torch.stack([load_mask(p, ds.img_size, clip['id'], ds.geometry) if ok else empty
                            for p, ok in zip(paths, has)])  # (T, H, W)
        return dict(item, mask=mask, has_mask=has)


def collate(items):
    """data.collate, plus mask (B, T, H, W) and has_mask (B, T) when the items have them."""
    batch = data.collate(items)
    for key in ('mask', 'has_mask'):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def clip_loader(dataset, num_clips, batch_size, num_workers):
    """The first num_clips clips of dataset, in order, as collated batches."""
    subset = Subset(dataset, range(min(num_clips, len(dataset))))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)


def localization_dataset(data_json, config, num_frames, geometry, label_csv=None):
    """Eval-mode frames and weighted object masks in a protocol's geometry ('full' or 'crop')."""
    return MaskedClips(data.AVDataset(data_json, label_csv=label_csv, mode='eval',
                                      audio_length=config.audio_length,
                                      num_mel_bins=config.num_mel_bins, img_size=config.img_size,
                                      num_frames=num_frames, geometry=geometry))


def localization_map(model, audio, image, dtype='float32'):
    """Sound-prompted localisation map: cos(g_a, visual patch token) per patch, bilinearly upsampled
    to the frame. audio (B, L, F), image (B, 3, H, W) -> (B, H, W) float32 in [-1, 1]."""
    with autocast(audio.device, dtype):
        g_a, _, _, tokens_v = model.forward_features(audio, image)
    cos = F.cosine_similarity(g_a.float()[:, None], tokens_v.float(), dim=-1)  # (B, Nv)
    H, W = image.shape[-2:]
    grid = cos.view(-1, 1, *model.grid_v)  # (B, 1, h, w)
    return F.interpolate(grid, size=(H, W), mode='bilinear', align_corners=False)[:, 0]


# -----------------------------------------------------------------------------
# pictures

def localize_scale(H, W, display=224):
    """Integer enlargement of a localisation panel to at least `display` pixels wide or high."""
    return max(1, math.ceil(display / max(H, W)))


def mask_outline(mask):
    """(H, W) mask (> 0 = object) -> (H, W) bool: its pixels with one of their 8 neighbours outside
    it (or off the frame)."""
    mask = mask > 0
    m = F.pad(mask[None, None].float(), (1, 1, 1, 1))  # (1, 1, H + 2, W + 2), outside = 0
    inner = -F.max_pool2d(-m, 3, stride=1)[0, 0]  # (H, W) erosion: 1 where the whole 3x3 is inside
    return mask & (inner < 0.5)


def picture(rgb, heat, mask=None, alpha=0.5):
    """[frame | map overlaid, mask outline white] as a PIL image, enlarged by localize_scale."""
    H, W = rgb.shape[:2]
    hot = colormap(unit_range(heat), TURBO)
    overlay = (rgb * (1 - alpha) + hot * alpha).round().astype(np.uint8)
    if mask is not None:
        overlay[mask_outline(mask).numpy()] = 255
    canvas = Image.new('RGB', (2 * W, H))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    canvas.paste(Image.fromarray(overlay), (W, 0))
    s = localize_scale(H, W)  # small frames are enlarged so that a person can see them
    return canvas.resize((2 * W * s, H * s), Image.BICUBIC)


@torch.no_grad()
def localize(model, dataset, out_dir, frame=None, num_clips=16, batch_size=8, device='cpu',
             num_workers=0, dtype='float32'):
    """Writes out_dir/<id>.png (picture) for frame t (middle by default) of the first num_clips
    clips; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for batch in tqdm(clip_loader(dataset, num_clips, batch_size, num_workers), desc='localize',
                      leave=False):
        T = batch['audio'].shape[1]
        t = pick_frame(frame, T)
        audio = batch['audio'][:, t].to(device)  # (B, L, F)
        image = batch['image'][:, t].to(device)  # (B, 3, H, W)
        heat = localization_map(model, audio, image, dtype).cpu()  # (B, H, W)
        for b, clip_id in enumerate(batch['id']):
            mask = batch['mask'][b, t] if 'mask' in batch else None
            paths.append(os.path.join(out_dir, safe_name(clip_id) + '.png'))
            picture(frame_to_rgb(image[b]), heat[b], mask).save(paths[-1])
    return paths


# -----------------------------------------------------------------------------
# the frames that are scored

def first_class(label):
    """A clip's class for DenseAV's per-class pooling: its first label, -1 without labels."""
    return int(label.argmax()) if label.numel() and label.any() else -1


@torch.no_grad()
def masked_frames(model, dataset, skipped, batch_size=8, device='cpu', num_workers=0,
                  num_clips=None, dtype='float32'):
    """Every frame (of the first num_clips clips) whose mask file exists and is not empty, batch by
    batch: yields (rows [(clip id, frame, class)], maps (n, H, W) float32 on CPU, masks (n, H, W)
    weights); counts the other frames into skipped['no mask file'] and skipped['empty mask']."""
    loader = clip_loader(dataset, num_clips or len(dataset), batch_size, num_workers)
    for batch in tqdm(loader, desc='localisation metrics', leave=False):
        has, mask = batch['has_mask'], batch['mask']  # (B, T), (B, T, H, W)
        use = has & (mask > 0).flatten(2).any(dim=2)  # (B, T)
        skipped['no mask file'] += int((~has).sum())
        skipped['empty mask'] += int((has & ~use).sum())
        if not use.any():
            continue
        b_idx, t_idx = use.nonzero(as_tuple=True)
        heat = localization_map(model, batch['audio'][b_idx, t_idx].to(device),
                                batch['image'][b_idx, t_idx].to(device), dtype).cpu()  # (n, H, W)
        rows = [(batch['id'][b], t, first_class(batch['label'][b]))
                for b, t in zip(b_idx.tolist(), t_idx.tolist())]
        yield rows, heat, mask[b_idx, t_idx].float()


def no_frame_error(skipped):
    return ValueError(f"no frame has a non-empty mask ({skipped['no mask file']} frames without a "
                      "mask file, "
                      f"{skipped['empty mask']} with an empty one); masks are 8-bit PNGs at "
                      '{video_path}/mask_{i}/{video_id}.png')


def centre_prior(H, W):
    """(H, W) map of the centre-prior baseline: minus the distance to the frame centre."""
    y = torch.arange(H, dtype=torch.float32)[:, None] - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float32)[None] - (W - 1) / 2
    return -(x ** 2 + y ** 2).sqrt()


# -----------------------------------------------------------------------------
# Flickr-SoundNet / VGG-SS (LVS, EZ-VSL): cIoU, AUC, pointing game

def ciou(heat, gt, top=0.5):
    """cIoU of one map heat (H, W) against a ground truth gt (H, W), bool or consensus weights in
    [0, 1]. The prediction is the pixels at or above the value of rank int(HW (1 - top)) in
    ascending order: about the `top` share of the frame (0.5, the median, in the LVS / EZ-VSL code).
    With a binary G inside P, cIoU = |G| / |P|: it cannot exceed (object share) / top."""
    heat, gt = heat.double().flatten(), gt.double().flatten()
    heat = unit_range(heat)
    threshold = heat.sort().values[int(heat.numel() * (1 - top))]
    pred = (heat >= threshold).double()
    return ((pred * gt).sum() / (gt.sum() + (pred * (gt == 0)).sum())).item()


def pointing_hit(heat, gt):
    """Whether the (first) maximum of heat (H, W) lies on the object: gt (H, W) > 0 there."""
    return bool(gt.flatten()[heat.flatten().argmax()] > 0)


def localization_summary(cious, hits):
    """Per-frame cIoUs and pointing hits -> cIoU@0.5, AUC, mean cIoU, pointing (percent), frames."""
    c = np.asarray(cious, dtype=np.float64)
    success = [float((c >= thr).mean()) for thr in AUC_THRESHOLDS]
    auc = sum((AUC_THRESHOLDS[i + 1] - AUC_THRESHOLDS[i]) * (success[i] + success[i + 1]) / 2
              for i in range(20))
    return {'cIoU@0.5': 100.0 * float((c >= 0.5).mean()), 'AUC': 100.0 * auc,
            'mean cIoU': 100.0 * float(c.mean()),
            'pointing': 100.0 * float(np.mean(hits)), 'frames': int(len(c))}


def localization_scores(model, dataset, batch_size=8, device='cpu', num_workers=0, num_clips=None,
                        top=0.5, dtype='float32'):
    """The ezvsl protocol's metrics of the model and of the centre prior over every frame with a
    non-empty mask; dataset: eval mode with masks (localization_dataset(geometry='full') for the
    benchmarks' geometry); top: the share of the frame predicted for cIoU (ciou).
    Returns {'model': summary, 'centre prior': summary, 'skipped': {...}, 'per_frame': [...]}."""
    scores = {'model': ([], []), 'centre prior': ([], [])}
    per_frame, skipped = [], {'no mask file': 0, 'empty mask': 0}
    for rows, heat, gt in masked_frames(model, dataset, skipped, batch_size, device, num_workers,
                                        num_clips, dtype):
        prior = centre_prior(*heat.shape[-2:])
        for k, (clip_id, t, _) in enumerate(rows):
            row = {'id': clip_id, 'frame': t}
            for name, h in (('model', heat[k]), ('centre prior', prior)):
                c, hit = ciou(h, gt[k], top), pointing_hit(h, gt[k])
                scores[name][0].append(c)
                scores[name][1].append(hit)
                row[name] = {'cIoU': c, 'hit': hit}
            per_frame.append(row)
    if not per_frame:
        raise no_frame_error(skipped)
    out = {name: localization_summary(*s) for name, s in scores.items()}
    out['skipped'] = skipped
    out['per_frame'] = per_frame
    return out


# -----------------------------------------------------------------------------
# ADE20K-Sound (DenseAV): pixel AP and mIoU

def pixel_average_precision(scores, targets):
    """Average precision of scores (P,) against targets (P,) bool, as sklearn's
    average_precision_score (and torchmetrics' binary_average_precision, DenseAV's): sum over the
    distinct score thresholds of (recall step) x precision, so tied pixels share one threshold."""
    s, order = scores.double().flatten().sort(descending=True)
    pos = targets.flatten()[order].double()  # (P,) best first
    true_pos = pos.cumsum(0)
    run_end = torch.cat([s[1:] != s[:-1],
                         torch.ones(1, dtype=torch.bool)])  # last pixel of each tie run
    precision = true_pos[run_end] / (torch.arange(len(s), dtype=torch.float64)[run_end] + 1)
    recall_step = torch.diff(true_pos[run_end],
                             prepend=torch.zeros(1, dtype=torch.float64)) / true_pos[-1]
    return float((recall_step * precision).sum())


def best_threshold_iou(scores, targets, k=20):
    """DenseAV's multi_iou: the best IoU of (scores > threshold) with targets over k thresholds
    evenly spaced from scores' minimum to maximum (an empty union counts 0)."""
    scores = scores.flatten()
    targets = targets.flatten()
    best = 0.0
    for threshold in torch.linspace(float(scores.min()), float(scores.max()), k):
        pred = scores > threshold
        union = int((pred | targets).sum())
        best = max(best, int((pred & targets).sum()) / union if union else 0.0)
    return best


def pooled_summary(pooled, k=20):
    """{class: (maps, masks)} lists of (H, W) -> mAP, mIoU (percent, mean over classes), classes."""
    per_class = {}
    for c, (maps, masks) in pooled.items():
        heat, gt = torch.stack(maps).flatten(), torch.stack(masks).flatten() > 0.5
        if gt.any():
            per_class[c] = {'AP': 100 * pixel_average_precision(heat, gt),
                            'IoU': 100 * best_threshold_iou(heat, gt, k), 'frames': len(maps)}
    if not per_class:
        raise ValueError('no scored frame has a mask pixel above 0.5: pixel AP is undefined')
    return {'mAP': float(np.mean([v['AP'] for v in per_class.values()])),
            'mIoU': float(np.mean([v['IoU'] for v in per_class.values()])),
            'classes': len(per_class), 'frames': sum(v['frames'] for v in per_class.values()),
            'per_class': {str(c): v for c, v in per_class.items()}}


def denseav_scores(model, dataset, batch_size=8, device='cpu', num_workers=0, num_clips=None, k=20,
                   dtype='float32'):
    """The denseav protocol's metrics of the model and of the centre prior over every frame with a
    non-empty mask; dataset: eval mode with masks (localization_dataset(geometry='crop') for
    DenseAV's geometry). DenseAV min-max scales the maps of the whole set jointly first: neither AP
    nor the thresholds' IoU change under it, so the raw maps are pooled.
    Returns {'model': summary, 'centre prior': summary, 'skipped': {...}}."""
    pooled = {'model': {}, 'centre prior': {}}
    skipped = {'no mask file': 0, 'empty mask': 0}
    for rows, heat, gt in masked_frames(model, dataset, skipped, batch_size, device, num_workers,
                                        num_clips, dtype):
        prior = centre_prior(*heat.shape[-2:])
        for i, (_, _, c) in enumerate(rows):
            for name, h in (('model', heat[i]), ('centre prior', prior)):
                maps, masks = pooled[name].setdefault(c, ([], []))
                maps.append(h)
                masks.append(gt[i])
    if not pooled['model']:
        raise no_frame_error(skipped)
    out = {name: pooled_summary(p, k) for name, p in pooled.items()}
    out['skipped'] = skipped
    return out


# -----------------------------------------------------------------------------
# command line

def print_ezvsl(scores, top):
    m = scores['model']
    print(f"\nFlickr-SoundNet / VGG-SS protocol (LVS / EZ-VSL code; whole frame resized), "
          f"{m['frames']} frames with a non-empty mask (skipped: "
          f"{scores['skipped']['no mask file']} without a mask file, "
          f"{scores['skipped']['empty mask']} empty)")
    if top != 0.5:
        print(f'cIoU with the top {top:.0%} of each map predicted (the benchmarks use 50%)')
    print_table(['map', 'cIoU@0.5', 'AUC', 'mean cIoU', 'pointing'],
                [[name, s['cIoU@0.5'], s['AUC'], s['mean cIoU'], s['pointing']]
                 for name, s in scores.items() if name in ('model', 'centre prior')])
    print('pointing: not in the LVS / EZ-VSL code (the map maximum on the object, no tolerance)')


def print_denseav(scores):
    m = scores['model']
    print(f"\nADE20K-Sound protocol (DenseAV eval_utils; shorter side resized, centre crop), "
          f"{m['frames']} "
          f"frames in {m['classes']} classes, pixels pooled per class")
    print_table(['map', 'mAP (pixel AP)', 'mIoU'],
                [[name, s['mAP'], s['mIoU']] for name, s in scores.items()
                 if name in ('model', 'centre prior')])


def has_any_mask(dataset, num_frames):
    return any(os.path.isfile(mask_path(clip['video_path'], i, clip['id']))
               for clip in dataset.clips for i in range(num_frames))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument('--data', required=True, help='dataset JSON (masks beside the frames)')
    parser.add_argument('--label_csv',
                        help='denseav: classes for the per-class pooling (default: one class)')
    parser.add_argument('--out', required=True,
                        help='output directory: one PNG per clip, metrics.json')
    parser.add_argument('--num_clips', type=int, default=16, help='pictures of the first N clips')
    parser.add_argument('--frame', type=int,
                        help='frame index of the pictures (default: the middle one)')
    parser.add_argument('--metrics_clips', type=int,
                        help='metrics over the first N clips (default: all)')
    parser.add_argument('--protocols', nargs='+', choices=PROTOCOLS, default=list(PROTOCOLS),
                        help='metric protocols, each in its benchmark geometry')
    parser.add_argument('--top', type=float, default=0.5,
                        help='ezvsl: share of each map predicted for cIoU (0.5 as on '
                             'Flickr-SoundNet / '
                             'VGG-SS; smaller for small objects)')
    parser.add_argument('--thresholds', type=int, default=20,
                        help='denseav: thresholds of the best IoU')
    args = parse_model_args(parser, argv)

    model = load_model(args.ckpt, args.device, args.weights)
    full = localization_dataset(args.data, model.config, args.num_frames, 'full', args.label_csv)
    paths = localize(model, full, args.out, args.frame, args.num_clips, args.batch_size,
                     args.device, args.num_workers, args.dtype)
    print(f'wrote {len(paths)} heat maps to {args.out}')
    if not has_any_mask(full, args.num_frames):
        print('no object masks ({video_path}/mask_{i}/{video_id}.png): no localisation metrics')
        return
    result = dict(ckpt=args.ckpt, weights=args.weights, data=args.data, top=args.top)
    if 'ezvsl' in args.protocols:
        result['ezvsl'] = localization_scores(model, full, args.batch_size, args.device,
                                              args.num_workers,
                                              args.metrics_clips, args.top, args.dtype)
        print_ezvsl(result['ezvsl'], args.top)
    if 'denseav' in args.protocols:
        crop = localization_dataset(args.data, model.config, args.num_frames, 'crop',
                                    args.label_csv)
        result['denseav'] = denseav_scores(model, crop, args.batch_size, args.device,
                                           args.num_workers,
                                           args.metrics_clips, args.thresholds, args.dtype)
        print_denseav(result['denseav'])
    path = os.path.join(args.out, 'metrics.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
