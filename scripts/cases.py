"""
Retrieval case study (TG-DP supplement, Fig. 3): the top-k frames of a few audio queries, one
checkpoint or two side by side, the true match outlined.

    python scripts/cases.py --ckpt out/sync/ckpt.pt --compare out/tgdp/ckpt.pt --data eval.json \
        --out cases.png [--queries 3 17 42 | --num_queries 4] [--k 5]

For each audio query (--queries, indices in --data, or a reproducible random pick of --num_queries
from --seed): the query's spectrogram segment of frame --frame (the middle one by default), then per
checkpoint the frames of its top --k visual candidates, best first, ranked A->V with the scores
evaluate.py retrieval ranks with (--strategy, diag_mean by default); the true match is outlined in
green and its rank (ties count against the model) is written after each group. The ranked ids are
printed too. --cache DIR keeps the extracted features for the next run.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse

import torch
from PIL import Image, ImageDraw, ImageFont

from evaluate import STRATEGIES, features_for, make_dataset, similarity
from model import ModelConfig
from scripts.plot import (add_compare_args, add_model_args, checkpoint_titles, frame_to_rgb,
                          parse_model_args, pick_frame, save_png, spectrogram_to_rgb)


def case_study(features, queries, k=5, strategy='diag_mean'):
    """Audio -> visual retrieval for the clips `queries` (list of indices), from the same scores as
    evaluate.retrieval (similarity(g_a, g_v)): (Q, k) candidate indices, best first, their scores,
    and the rank of each query's true match (ties count against the model, as in
    retrieval_metrics)."""
    sim = similarity(features['g_a'][queries], features['g_v'], strategy)  # (Q, N)
    scores, idx = sim.topk(min(k, sim.shape[1]), dim=1)
    true = sim[torch.arange(len(queries)), torch.as_tensor(queries)]  # (Q,)
    return idx, scores, (sim >= true[:, None]).sum(dim=1)


def cases_plot(dataset, features, out_path, queries, k=5, titles=None, frame=None,
               strategy='diag_mean', cell=96):
    """Retrieval case study (TG-DP supplement, Fig. 3): one row per audio query (its spectrogram
    segment of frame t, middle by default), then per checkpoint the middle frames of its top-k
    visual candidates, best first; the true match is outlined in green, and the rank of the true
    match is written after each group. features: a list of extract_features dicts of `dataset`
    (one per checkpoint). Returns {'topk': [(Q, k) per checkpoint], 'boxes': {(p, q, j): cell
    box}}."""
    features = [features] if isinstance(features, dict) else list(features)
    titles = titles or [f'checkpoint {p + 1}' for p in range(len(features))]
    T = features[0]['g_a'].shape[1]
    t = pick_frame(frame, T)
    Q = len(queries)
    items = {}

    def item(i):  # eval items load every frame: keep the few that are drawn
        if i not in items:
            items[i] = dataset[i]
        return items[i]

    font = ImageFont.load_default()
    gap, label_h, spec_w, after = 12, 16, int(1.5 * cell), 70
    group_w = k * (cell + 4) + after
    W = 8 + spec_w + gap + len(features) * (group_w + gap)
    H = 2 * label_h + Q * (cell + label_h + 8)
    canvas = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 2), f'audio query (frame {t})', fill='black', font=font)
    topk, boxes = [], {}
    for p, feats in enumerate(features):
        idx, _, ranks = case_study(feats, queries, k, strategy)
        topk.append(idx)
        x0 = 8 + spec_w + gap + p * (group_w + gap)
        draw.text((x0, 2), f'{titles[p]}: top {k} frames (A->V, {strategy})', fill='black',
                  font=font)
        for q in range(Q):
            y = 2 * label_h + q * (cell + label_h + 8)
            for j, c in enumerate(idx[q].tolist()):
                box = (x0 + j * (cell + 4), y, x0 + j * (cell + 4) + cell, y + cell)
                img = Image.fromarray(frame_to_rgb(item(c)['image'][t])).resize((cell, cell),
                                                                                Image.BICUBIC)
                canvas.paste(img, box[:2])
                hit = c == queries[q]
                draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 1, box[3] + 1),
                               outline=(0, 200, 0) if hit else (200, 200, 200),
                               width=3 if hit else 1)
                draw.text((box[0], box[3] + 2), f'{j + 1}', fill='black', font=font)
                boxes[(p, q, j)] = box
            draw.text((x0 + k * (cell + 4) + 4, y + cell // 2 - 6), f'match: #{int(ranks[q])}',
                      fill='black', font=font)
    for q, i in enumerate(queries):
        y = 2 * label_h + q * (cell + label_h + 8)
        spec = Image.fromarray(spectrogram_to_rgb(item(i)['audio'][t])).resize((spec_w, cell),
                                                                               Image.BICUBIC)
        canvas.paste(spec, (8, y))
        draw.text((8, y + cell + 2), str(item(i)['id'])[:24], fill='black', font=font)
    save_png(canvas, out_path)
    return dict(topk=topk, boxes=boxes)


def pick_queries(queries, num_queries, num_clips, seed):
    """--queries checked against the set, or a reproducible random pick of num_queries clips."""
    if queries:
        bad = [q for q in queries if not 0 <= q < num_clips]
        if bad:
            raise ValueError(f'--queries {bad} outside 0..{num_clips - 1}')
        return queries
    order = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:num_queries].tolist())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_compare_args(parser)
    parser.add_argument('--data', required=True, help='dataset JSON or shard set')
    parser.add_argument('--out', required=True, help='output .png')
    parser.add_argument('--queries', type=int, nargs='+',
                        help='query clips (indices in --data; default: a random pick)')
    parser.add_argument('--num_queries', type=int, default=4)
    parser.add_argument('--k', type=int, default=5, help='retrieved clips shown per query')
    parser.add_argument('--frame', type=int, help='frame shown (default: the middle one)')
    parser.add_argument('--strategy', choices=STRATEGIES, default='diag_mean')
    parser.add_argument('--seed', type=int, default=0, help='random pick of the queries')
    args = parse_model_args(parser, argv)
    titles = checkpoint_titles(args.ckpt, args.compare, args.titles)
    feats = [features_for(ckpt, args.data, None, args.weights, 'joint', args.num_frames, args.cache,
                          dtype=args.dtype, batch_size=args.batch_size, device=args.device,
                          num_workers=args.num_workers)
             for ckpt in [args.ckpt] + ([args.compare] if args.compare else [])]
    if any(f['ids'] != feats[0]['ids'] for f in feats):
        raise ValueError('the two checkpoints were evaluated on different clips')
    queries = pick_queries(args.queries, args.num_queries, feats[0]['g_a'].shape[0], args.seed)
    dataset = make_dataset(args.data, None, ModelConfig(**feats[0]['model_args']), args.num_frames)
    out = cases_plot(dataset, feats, args.out, queries, args.k, titles, args.frame, args.strategy)
    ids = feats[0]['ids']
    for p, title in enumerate(titles):
        print(f'{title}: ' + '  '.join(f"{ids[q]} -> {[ids[c] for c in out['topk'][p][i].tolist()]}"
                                       for i, q in enumerate(queries)))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
