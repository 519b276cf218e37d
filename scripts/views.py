"""
What TG-DP's contrastive views keep, from a teacher checkpoint.

    python scripts/views.py --ckpt out/ckpt.pt --weights teacher --data eval.json \
        [--mask_ratio 0.5] [--out views.json]

For every frame of the clips (the first --num_clips), the teacher's priorities (its raw head-mean
attention of the global token over the patches, as train.py computes them) and the view each
contrastive masking of masking.CONTRASTIVE_MASKINGS keeps at --mask_ratio, summarised per modality:

  priority kept   the share of the teacher's priority mass the kept patches hold (a uniformly random
                  view keeps 1 - ratio of it)
  overlap         the mean Jaccard overlap of the kept patch sets of two frames of different clips
                  (does the view pick the same patches for every clip?)
  object kept     with object masks ({video_path}/mask_{i}/{video_id}.png): the share of the
                  sounding object's pixels (mask weights) inside the kept visual patches (random: 1
                  - ratio)

Percent; printed as a table and written to --out as JSON. --seed draws the random and Gumbel views.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import json

import torch
from tqdm import tqdm

import masking
from evaluate import load_model, print_table
from model import autocast
from scripts.localize import clip_loader, localization_dataset
from scripts.plot import add_model_args, parse_model_args


def keep_overlap(keep, groups, num_patches):
    """Mean Jaccard overlap |K_i & K_j| / |K_i | K_j| of the kept patch sets keep (n, k) over the
    pairs (i, j) with groups[i] != groups[j] (frames of different clips)."""
    hot = torch.zeros(keep.shape[0], num_patches).scatter_(1, keep.cpu(), 1.0)  # (n, N)
    total, pairs = 0.0, 0
    for i in range(0, len(hot), 1024):  # 1024 rows of the (n, n) pair matrix at a time
        inter = hot[i:i + 1024] @ hot.T  # (c, n)
        other = groups[i:i + 1024, None] != groups[None, :]
        total += float((inter / (2 * keep.shape[1] - inter))[other].sum())
        pairs += int(other.sum())
    return total / pairs


@torch.no_grad()
def teacher_priorities(model, dataset, batch_size=8, device='cpu', num_workers=0, num_clips=None,
                       dtype='float32'):
    """Raw teacher priorities of every frame of the first num_clips clips: {'a': (n, Na), 'v': (n,
    Nv)}, the clip of each frame (n,), and the object pixels per visual patch (n, Nv) (None without
    masks)."""
    raw, objects, groups = {'a': [], 'v': []}, [], []
    loader = clip_loader(dataset, num_clips or len(dataset), batch_size, num_workers)
    for n, batch in enumerate(tqdm(loader, desc='teacher views', leave=False)):
        B, T = batch['audio'].shape[:2]
        with autocast(device, dtype):
            _, _, p_a, p_v = model.forward_teacher(batch['audio'].flatten(0, 1).to(device),
                                                   batch['image'].flatten(0, 1).to(device))
        raw['a'].append(p_a.float().cpu())
        raw['v'].append(p_v.float().cpu())
        groups.append(torch.arange(B).repeat_interleave(T) + n * batch_size)
        if 'mask' in batch:
            p = model.config.patch_size
            m = batch['mask'].flatten(0, 1).float()  # (B T, H, W)
            objects.append(m.unfold(1, p, p).unfold(2, p, p).sum((-1, -2)).flatten(1))  # (B T, Nv)
    return ({k: torch.cat(v) for k, v in raw.items()}, torch.cat(groups),
            torch.cat(objects) if objects else None)


def view_scores(model, dataset, mask_ratio=0.5, batch_size=8, device='cpu', num_workers=0,
                num_clips=None, seed=0, dtype='float32'):
    """What each contrastive view of TG-DP shows the student, from a teacher
    (load_model(weights='teacher')) on every frame of the first num_clips clips; dataset: eval mode,
    masks=True adds the object measure. Per masking in masking.CONTRASTIVE_MASKINGS and modality:
    'priority' the teacher priority mass the kept patches hold (a uniform priority gives 1 -
    mask_ratio), 'overlap' keep_overlap across clips; visual 'object' the share of the sounding
    object's pixels inside kept patches (frames with a non-empty mask). Returns {masking: {'a':
    {...}, 'v': {...}}} with values in percent."""
    gen = torch.Generator().manual_seed(seed)
    raw, groups, objects = teacher_priorities(model, dataset, batch_size, device, num_workers,
                                              num_clips, dtype)
    no_masks = torch.zeros(0, dtype=torch.bool)
    has = objects.sum(1) > 0 if objects is not None else no_masks  # frames with an object
    out = {}
    for method in masking.CONTRASTIVE_MASKINGS:
        out[method] = {}
        for modality in ('a', 'v'):
            priority = raw[modality]  # (n, N)
            noise = torch.rand(priority.shape, generator=gen)
            normalized = masking.teacher_priority(priority)  # (n, N), sums to 1 per frame
            keep = masking.contrastive_keep(method, priority, mask_ratio, noise)  # from the raw
            s = dict(priority=100 * float(normalized.gather(1, keep).sum(1).mean()),
                     overlap=100 * keep_overlap(keep, groups, priority.shape[1]))
            if modality == 'v' and has.any():
                kept = objects.gather(1, keep).sum(1)[has]  # object pixels in kept patches
                s['object'] = 100 * float((kept / objects.sum(1)[has]).mean())
            out[method][modality] = s
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument('--data', required=True,
                        help='dataset JSON (object masks beside the frames, optional)')
    parser.add_argument('--mask_ratio', type=float, default=0.5, help='contrastive mask ratio')
    parser.add_argument('--num_clips', type=int, help='the first N clips (default: all)')
    parser.add_argument('--seed', type=int, default=0, help='noise of the random and Gumbel views')
    parser.add_argument('--out', help='results JSON')
    args = parse_model_args(parser, argv)
    if args.weights != 'teacher':
        print('views: the priorities come from --weights model (train.py guides with the teacher)')
    model = load_model(args.ckpt, args.device, args.weights)
    dataset = localization_dataset(args.data, model.config, args.num_frames, 'crop')
    scores = view_scores(model, dataset, args.mask_ratio, args.batch_size, args.device,
                         args.num_workers, args.num_clips, args.seed, args.dtype)
    n = min(args.num_clips or len(dataset), len(dataset))
    print(f'\ncontrastive views at mask ratio {args.mask_ratio} from the teacher priorities of {n} '
          f'clips x {args.num_frames} frames (percent; a uniformly random view keeps '
          f'{100 * (1 - args.mask_ratio):.0f}% '
          'of any priority or object)')
    print_table(['view', 'audio priority kept', 'audio overlap', 'visual priority kept',
                 'visual overlap',
                 'object pixels kept'],
                [[m, s['a']['priority'], s['a']['overlap'], s['v']['priority'], s['v']['overlap'],
                  s['v'].get('object', '-')] for m, s in scores.items()])
    print('overlap: mean Jaccard of the kept patch sets of two frames of different clips')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(ckpt=args.ckpt, weights=args.weights, data=args.data,
                           mask_ratio=args.mask_ratio, views=scores), f, indent=1)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
