"""
Embedding map (TG-DP supplement, Fig. 2): PCA or t-SNE of the clip-level audio (circles) and visual
(triangles) embeddings, coloured by class, one checkpoint or two side by side.

    python scripts/embed.py --ckpt out/ckpt.pt --data eval.json --label_csv labels.csv \
        --out embed.png
    python scripts/embed.py --method tsne --ckpt out/sync/ckpt.pt --compare out/tgdp/ckpt.pt \
        --data eval.json --label_csv labels.csv --out tsne.png

A clip's embedding per modality is the mean of its L2-normalised per-frame global tokens (g_a, g_v,
as retrieval scores them), normalised again; its colour is its first label (grey without one); only
the clips of the --max_classes most frequent classes are drawn, with a legend.

  pca   one fit on both modalities after centring each (otherwise the offset between the modalities
        takes the first component and hides the classes); the axes give the explained variance
  tsne  exact-gradient t-SNE written here (van der Maaten & Hinton 2008): perplexity --perplexity
        (30; at most a third of the points for small sets), PCA start, early exaggeration 12 for 250
        of 1000 steps, momentum 0.5 then 0.8, adaptive gains, learning rate max(N / 48, 50). It runs
        on the unit embeddings as they are, so a gap between the modalities shows (the demo-size
        models keep audio and video apart), or with --centre on each modality centred, as pca does
        (class structure across the modalities). O(N^2) per step: 1000 points (500 clips) take about
        35 s on one busy core, a few thousand some minutes.

--compare C2 draws a second checkpoint's map beside the first (--titles names the panels; default:
the checkpoints' folder names). --cache DIR keeps the extracted features for the next run.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from evaluate import features_for
from scripts.plot import (add_compare_args, add_model_args, checkpoint_titles, class_colour, marker,
                          parse_model_args, save_png)


def clip_embeddings(g):
    """(N, T, D) per-frame embeddings -> (N, D) clip embeddings: mean of the unit frames, unit."""
    return F.normalize(F.normalize(g.float(), dim=-1).mean(dim=1), dim=-1)


def clip_classes(features):
    """Class of each clip: its first label (-1 without labels)."""
    labels = features['labels']
    N = features['g_a'].shape[0]
    if not labels.numel():
        return [-1] * N
    return [c if labels[i, c] > 0 else -1 for i, c in enumerate(labels.argmax(dim=1).tolist())]


def top_classes(cls, max_classes):
    """Indices of the clips whose class is among the max_classes most frequent (ties: lower id)."""
    counts = {}
    for c in cls:
        if c >= 0:
            counts[c] = counts.get(c, 0) + 1
    if not counts:  # no labels: every clip (drawn grey)
        return list(range(len(cls)))
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:max_classes])
    return [i for i, c in enumerate(cls) if c in keep]


# -----------------------------------------------------------------------------
# t-SNE

def tsne_conditional(X, perplexity=30.0, tol=1e-5, max_steps=200):
    """Rows p_{j|i} (N, N) of t-SNE's input affinities for points X (N, D): a Gaussian per point
    whose precision is found by bisection so that the row's entropy is log(perplexity) (nats)."""
    X = X.double()
    N = X.shape[0]
    if not 1 <= perplexity < N - 1:
        raise ValueError(f't-SNE perplexity must lie in [1, {N - 1}) for {N} points, '
                         f'got {perplexity}')
    D = torch.cdist(X, X).square()  # (N, N)
    off = ~torch.eye(N, dtype=torch.bool)
    nearest = D.masked_fill(~off, float('inf')).min(dim=1, keepdim=True).values  # (N, 1)
    D = D - nearest  # the nearest neighbour at 0: no underflow
    D = D.masked_fill(~off, 0.0)
    beta = torch.ones(N, dtype=torch.float64)  # precision
    lo = torch.zeros(N, dtype=torch.float64)  # its lower bound
    hi = torch.full((N,), float('inf'), dtype=torch.float64)  # upper bound: none yet
    target = math.log(perplexity)
    for _ in range(max_steps):
        P = torch.exp(-beta[:, None] * D) * off  # (N, N), zero diagonal
        Z = P.sum(dim=1)
        H = Z.log() + beta * (P * D).sum(dim=1) / Z  # entropy of each normalised row
        if (H - target).abs().max() < tol:
            break
        high = H > target  # too flat: raise the precision
        lo = torch.where(high, beta, lo)
        hi = torch.where(high, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    return P / Z[:, None]


def tsne_kl_gradient(P, Y, with_kl=True):
    """KL(P || Q) (None unless with_kl) and its exact gradient (N, 2) for t-SNE's Student-t output
    affinities q_ij = (1 + |y_i - y_j|^2)^-1 / sum_{k != l} (1 + |y_k - y_l|^2)^-1:
    dKL/dy_i = 4 sum_j (p_ij - q_ij) (1 + |y_i - y_j|^2)^-1 (y_i - y_j)."""
    sq = (Y * Y).sum(dim=1)  # (N,)
    num = (1.0 + (sq[:, None] + sq[None] - 2.0 * Y @ Y.T).clamp(min=0.0)).reciprocal_()  # (N, N)
    num.fill_diagonal_(0.0)
    Q = num / num.sum()
    W = (P - Q).mul_(num)  # (N, N)
    grad = 4.0 * (W.sum(dim=1, keepdim=True) * Y - W @ Y)
    if not with_kl:
        return None, grad
    nz = P > 0
    kl = (P[nz] * (P[nz] / Q[nz].clamp(min=1e-300)).log()).sum()
    return kl.item(), grad


def tsne(X, perplexity=30.0, iters=1000, seed=0, exaggeration=12.0, exaggeration_iters=250,
         learning_rate=None):
    """t-SNE (van der Maaten & Hinton 2008) with exact gradients: X (N, D) -> (N, 2) float64.
    Symmetric affinities P = (p_{j|i} + p_{i|j}) / 2N; start from the first two principal components
    scaled to a standard deviation of 1e-4 (deterministic; seed only breaks PCA's sign ambiguity
    with a tiny jitter); gradient descent with momentum 0.5 then 0.8, per-coordinate gains
    (+0.2 / x0.8), early exaggeration of P for the first exaggeration_iters steps, learning rate
    max(N / exaggeration / 4, 50) by default (as scikit-learn's 'auto'). O(N^2) memory and time per
    step: a few thousand points take seconds to minutes."""
    X = X.double()
    N = X.shape[0]
    P = tsne_conditional(X, perplexity)
    P = (P + P.T) / (2 * N)
    Xc = X - X.mean(dim=0)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    Y = Xc @ Vh[:2].T  # (N, 2)
    Y = Y / Y[:, 0].std().clamp(min=1e-12) * 1e-4
    Y = Y + 1e-6 * torch.randn(N, 2, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(seed))
    lr = learning_rate or max(N / exaggeration / 4, 50.0)
    update, gains = torch.zeros_like(Y), torch.ones_like(Y)
    P_early = P * exaggeration
    for it in range(iters):
        early = it < exaggeration_iters
        _, grad = tsne_kl_gradient(P_early if early else P, Y, with_kl=False)
        gains = torch.where(update * grad < 0, gains + 0.2, gains * 0.8).clamp(min=0.01)
        update = (0.5 if early else 0.8) * update - lr * gains * grad
        Y = Y + update
    return Y


# -----------------------------------------------------------------------------
# the map

def embedding_coords(features, method='pca', keep=None, perplexity=30.0, seed=0, centre=None):
    """2-D map of the clip-level audio and visual embeddings of the clips `keep` (default all):
    (xy (2n, 2): audio rows then visual rows, (x label, y label), title).
    pca: fit jointly after centring each modality (otherwise the offset between the modalities takes
    the first component and hides the classes); tsne: on the unit-normalised embeddings as they are,
    so that a gap between the modalities shows (centre=True: each modality centred first, as
    pca)."""
    a, v = clip_embeddings(features['g_a']), clip_embeddings(features['g_v'])  # (N, D) each
    if keep is not None:
        a, v = a[keep], v[keep]
    n = a.shape[0]
    if method == 'pca':
        X = torch.cat([a - a.mean(dim=0), v - v.mean(dim=0)]).double()  # (2n, D)
        _, S, Vh = torch.linalg.svd(X, full_matrices=False)
        explained = (S[:2] ** 2 / (S ** 2).sum()).tolist()
        return (X @ Vh[:2].T, (f'PC1 ({explained[0]:.0%} var)', f'PC2 ({explained[1]:.0%})'),
                f'PCA of clip embeddings (each modality centred): {n} clips')
    if method == 'tsne':
        perplexity = min(perplexity, (2 * n - 2) / 3)  # small sets: at most a third of the points
        X = torch.cat([a - a.mean(dim=0), v - v.mean(dim=0)] if centre else [a, v])
        return (tsne(X, perplexity, seed=seed), ('t-SNE 1', 't-SNE 2'),
                f"t-SNE of clip embeddings{' (each modality centred)' if centre else ''}, "
                f"perplexity {perplexity:.0f}: {n} clips")
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def draw_panel(draw, x0, panel_w, size, coords, cls, r, font):
    """One checkpoint's map in the panel starting at x0: frame, titles, markers."""
    xy, (xlabel, ylabel), title = coords
    N, m = len(cls), size // 20
    box = (x0 + m, m, x0 + panel_w - m // 2, size - m)  # plot area (left, top, right, bottom)
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((x0 + m, m // 4), title, fill='black', font=font)
    draw.text((x0 + m, size - m + 4), xlabel, fill='black', font=font)
    draw.text((x0 + 2, m - 14), ylabel, fill='black', font=font)
    lo, hi = xy.min(dim=0).values, xy.max(dim=0).values
    span = (hi - lo).clamp(min=1e-12)
    inner = 0.92  # keep markers off the frame
    # equal aspect
    scale = inner * min((box[2] - box[0]) / span[0].item(), (box[3] - box[1]) / span[1].item())
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    mid = (lo + hi) / 2
    # a fixed shuffled drawing order: no class is drawn last, on top of the others
    order = torch.randperm(2 * N, generator=torch.Generator().manual_seed(0)).tolist()
    for i in order:
        px = cx + scale * (xy[i, 0] - mid[0]).item()
        py = cy - scale * (xy[i, 1] - mid[1]).item()
        c = cls[i % N]
        marker(draw, px, py, r, 'circle' if i < N else 'triangle',
               class_colour(c) if c >= 0 else (150, 150, 150))


def draw_legend(draw, lx, size, legend_w, cls, names, r, font):
    """Marker shapes, then one swatch per class present (names truncated; '... N more' if full)."""
    m, line = size // 20, 16
    ly = m
    for shape, text in (('circle', 'audio'), ('triangle', 'video')):
        marker(draw, lx + r, ly + 6, r, shape, (90, 90, 90))
        draw.text((lx + 3 * r + 4, ly), text, fill='black', font=font)
        ly += line
    ly += line // 2
    present = sorted(set(c for c in cls if c >= 0))
    room = (size - m - ly) // line
    for k, c in enumerate(present):
        if k == room - 1 and len(present) > room:
            draw.text((lx, ly), f'... {len(present) - k} more classes', fill='black', font=font)
            break
        draw.rectangle((lx, ly + 2, lx + 10, ly + 12), fill=class_colour(c))
        name = names[c] if c < len(names) else f'class {c}'
        max_chars = (legend_w - 20) // 6  # about 6 px per character of the default font
        draw.text((lx + 16, ly), name if len(name) <= max_chars else name[:max_chars - 3] + '...',
                  fill='black', font=font)
        ly += line


def embed_plot(features, out_path, size=800, method='pca', titles=None, max_classes=None,
               perplexity=30.0, centre=False):
    """Map of the clip-level audio (circles) and visual (triangles) embeddings coloured by class
    (the first label of each clip; grey for unlabelled clips), with a legend. features: one dict
    (one panel) or a list of dicts of the same clips (panels side by side, e.g. two checkpoints;
    titles name them). method: 'pca' or 'tsne' (embedding_coords; centre: t-SNE of centred
    modalities). max_classes: only the clips of the most frequent classes. Writes a PNG of
    (n * (size - legend) + legend, size): (size, size) for one panel."""
    features = [features] if isinstance(features, dict) else list(features)
    cls_all = clip_classes(features[0])
    keep = top_classes(cls_all, max_classes) if max_classes else list(range(len(cls_all)))
    if not keep:
        raise ValueError('no clip to draw: no clip has a label among the selected classes')
    cls = [cls_all[i] for i in keep]
    legend_w = size * 2 // 7
    panel_w = size - legend_w
    canvas = Image.new('RGB', (len(features) * panel_w + legend_w, size), 'white')
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    r = max(2, size // 160)
    for p, feats in enumerate(features):
        xy, labels, title = embedding_coords(feats, method, keep, perplexity, centre=centre)
        title = f'{titles[p]}: {title}' if titles else title
        draw_panel(draw, p * panel_w, panel_w, size, (xy, labels, title), cls, r, font)
    draw_legend(draw, len(features) * panel_w, size, legend_w, cls,
                features[0].get('class_names') or [], r, font)
    return save_png(canvas, out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_compare_args(parser)
    parser.add_argument('--data', required=True, help='dataset JSON or shard set')
    parser.add_argument('--label_csv', required=True)
    parser.add_argument('--out', required=True, help='output .png')
    parser.add_argument('--method', choices=('pca', 'tsne'), default='pca')
    parser.add_argument('--perplexity', type=float, default=30.0, help='t-SNE')
    parser.add_argument('--centre', action='store_true',
                        help='t-SNE: centre each modality first (hides the gap between them)')
    parser.add_argument('--max_classes', type=int, default=10,
                        help='only the clips of the N most frequent classes')
    parser.add_argument('--size', type=int, default=800,
                        help='image height in pixels (and width of one panel + legend)')
    args = parse_model_args(parser, argv)
    titles = checkpoint_titles(args.ckpt, args.compare, args.titles)
    feats = [features_for(ckpt, args.data, args.label_csv, args.weights, 'joint', args.num_frames,
                          args.cache, dtype=args.dtype, batch_size=args.batch_size,
                          device=args.device, num_workers=args.num_workers)
             for ckpt in [args.ckpt] + ([args.compare] if args.compare else [])]
    embed_plot(feats, args.out, args.size, args.method, titles, args.max_classes, args.perplexity,
               args.centre)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
