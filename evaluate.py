"""
Evaluation with the papers' protocols (TG-DP and CAV-MAE Sync: zero-shot retrieval, attention probing),
so results compare with their tables.

  retrieval    zero-shot clip-to-clip retrieval, V->A and A->V: R@1/5/10 (percent) and median rank
  probe        frozen encoders, attention probe (CLS + 2 transformer layers) on the T per-frame
               [g_a; g_v] vectors: mAP (multi-label) or top-1 (single-label); --modality a|v: unimodal

The tools (localisation, views, reconstruction, embedding maps, case study, training dynamics, the
ablation runner) are programs in scripts/ that import this file; see each one's --help.

Examples:
  python evaluate.py retrieval --ckpt out/ckpt.pt --data vgg_retrieval.json --strategy diag_mean block_max --out r.json
  python evaluate.py probe --ckpt out/ckpt.pt --train as20k.json --eval as_eval.json --label_csv labels.csv \
      --cache feats

--ckpt takes a train.py checkpoint (--weights teacher picks its EMA teacher) or an official CAV-MAE Sync /
TG-DP release. Features of a (checkpoint, dataset) pair are extracted once (clips x frames batched into one
forward) and, with --cache DIR, stored so that re-running with another strategy or probe costs nothing.
Functions for other scripts: load_model, extract_features, similarity, retrieval_metrics, retrieval,
mean_average_precision, train_probe.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from model import KIND_NAMES, CAVMAESync, ModelConfig, checkpoint_kind, load_weights, read_checkpoint, warmup_cosine

STRATEGIES = ('diag_mean', 'block_mean', 'diag_max', 'block_max')


# -----------------------------------------------------------------------------
# loading

def load_model(ckpt_path, device='cpu', weights='model'):
    """A train.py checkpoint (dict with 'model', 'teacher', 'model_args') or an official CAV-MAE Sync /
    TG-DP state dict (bare or under 'model') -> CAVMAESync in eval mode on device, through model.load_weights
    as train.py's init_from. weights='teacher' picks the EMA teacher (encoder only: the model is built
    without a decoder, so the load stays strict)."""
    if weights not in ('model', 'teacher'):
        raise ValueError(f"weights must be 'model' or 'teacher', got {weights!r}")
    ckpt = read_checkpoint(ckpt_path)
    try:
        kind = checkpoint_kind(ckpt)
    except ValueError as e:
        raise ValueError(f'{ckpt_path}: {e}') from None
    if kind in ('mae', 'cavmae'):
        raise ValueError(f'{ckpt_path}: {KIND_NAMES[kind]} is an initialisation (train.py --init_from), '
                         'not a model to evaluate')
    config = ModelConfig(**ckpt['model_args']) if kind == 'train' else ModelConfig()
    model = CAVMAESync(config, decoder=(weights == 'model'))
    load_weights(model, ckpt, weights, name=ckpt_path)
    print(f'{ckpt_path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')
    return model.to(device).eval()


def make_dataset(data_json, label_csv, config, num_frames=16, masks=False):
    """Eval-mode dataset (all T frames and their aligned segments) at the model's input sizes, from a
    dataset JSON or a shard set (data.AVDataset: shard folder, index.json, brace pattern). With a
    label CSV every clip must carry labels (probing and the embedding plot score and colour by them);
    masks: the object masks too (localisation, views)."""
    return data.AVDataset(data_json, label_csv=label_csv, mode='eval', audio_length=config.audio_length,
                          num_mel_bins=config.num_mel_bins, img_size=config.img_size, num_frames=num_frames,
                          require_labels=label_csv is not None, masks=masks)


def autocast(device):
    """bf16 autocast on GPU, full precision elsewhere."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# features

@torch.no_grad()
def extract_features(model, dataset, batch_size=8, device='cpu', num_workers=0):
    """Per-frame global embeddings of every clip. Each batch of clips x frames goes through one
    forward_features call. batch_size counts clips (a forward sees batch_size * T frames).
    Returns dict(g_a, g_v (N, T, D) float32 on CPU, labels (N, C), ids [N], class_names [C])."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate, pin_memory=torch.device(device).type == 'cuda')
    g_a, g_v, labels, ids = [], [], [], []
    for batch in tqdm(loader, desc='features', unit='batch', leave=False):
        audio = batch['audio'].to(device, non_blocking=True)  # (B, T, L, F)
        image = batch['image'].to(device, non_blocking=True)  # (B, T, 3, H, W)
        B, T = audio.shape[:2]
        with autocast(device):
            a, v, _, _ = model.forward_features(audio.flatten(0, 1), image.flatten(0, 1), tokens=False)  # (B*T, D) each
        g_a.append(a.float().view(B, T, -1).cpu())
        g_v.append(v.float().view(B, T, -1).cpu())
        labels.append(batch['label'])
        ids += list(batch['id'])
    model.train(was_training)
    return dict(g_a=torch.cat(g_a), g_v=torch.cat(g_v), labels=torch.cat(labels).float(), ids=ids,
                class_names=list(getattr(dataset, 'class_names', None) or []))


def _file_stamp(path):
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _data_stamp(spec):
    """A dataset JSON's stamp, or a shard set's: every shard file and the index.json beside them."""
    if not data.is_shard_set(spec):
        return _file_stamp(spec)
    paths = [path for path, _ in data.shard_tables(spec)]
    index = os.path.join(os.path.dirname(paths[0]), 'index.json')
    return [_file_stamp(p) for p in paths + ([index] if os.path.isfile(index) else [])]


def features_for(args, data_json, label_csv=None):
    """extract_features for (args.ckpt, data_json), through the --cache directory when given: the
    model is only loaded when the features are not cached. Adds 'model_args' to the dict."""
    stamps = [_file_stamp(args.ckpt), args.weights, _data_stamp(data_json),
              _file_stamp(label_csv) if label_csv else None, args.num_frames]
    path = None
    if args.cache:
        key = hashlib.sha1(json.dumps(stamps).encode()).hexdigest()[:16]
        name = re.sub(r'[^\w.-]', '_', os.path.splitext(os.path.basename(data_json.rstrip('/')))[0])  # braces
        path = os.path.join(args.cache, f'{name}-{key}.pt')
        if os.path.exists(path):
            print(f'features of {data_json}: cached in {path}')
            return torch.load(path, weights_only=True)
    if getattr(args, 'model', None) is None:  # loaded once, for the first split that is not cached
        args.model = load_model(args.ckpt, args.device, args.weights)
    model = args.model
    dataset = make_dataset(data_json, label_csv, model.config, args.num_frames)
    t0 = time.time()
    feats = extract_features(model, dataset, args.batch_size, args.device, args.num_workers)
    feats['model_args'] = dataclasses.asdict(model.config)
    N, T, _ = feats['g_a'].shape
    print(f'features of {data_json}: {N} clips x {T} frames in {time.time() - t0:.1f} s')
    if path:
        os.makedirs(args.cache, exist_ok=True)
        torch.save(feats, path)
        print(f'features cached in {path}')
    return feats


# -----------------------------------------------------------------------------
# retrieval

def similarity(query, candidates, strategy='diag_mean', max_elements=2 ** 26):
    """Clip-to-clip scores (N, M) from per-frame embeddings query (N, T, D) and candidates (M, T, D),
    frame t of one clip aligned with frame t of the other. With cos the cosine of two frames:
      diag_mean   mean_t   cos(q_t, c_t)     (the papers' default)
      block_mean  mean_t,s cos(q_t, c_s)
      diag_max    max_t    cos(q_t, c_t)
      block_max   max_t,s  cos(q_t, c_s)
    All four are symmetric: similarity(a, b).T == similarity(b, a) (up to rounding). The max strategies are computed
    in chunks of queries holding at most max_elements frame-pair scores."""
    if strategy not in STRATEGIES:
        raise ValueError(f'unknown strategy {strategy!r}; choose from {STRATEGIES}')
    if query.dim() != 3 or candidates.dim() != 3 or query.shape[1:] != candidates.shape[1:]:
        raise ValueError(f'expected (N, T, D) and (M, T, D), got {tuple(query.shape)} and {tuple(candidates.shape)}')
    q = F.normalize(query.float(), dim=-1)  # (N, T, D): dot products are now cosines
    c = F.normalize(candidates.float(), dim=-1)  # (M, T, D)
    N, T, D = q.shape
    M = c.shape[0]
    if strategy == 'diag_mean':  # sum_t <q_t, c_t> is one dot product of the flattened clips
        return (q.reshape(N, T * D) @ c.reshape(M, T * D).T).div_(T)
    if strategy == 'block_mean':  # mean_t,s <q_t, c_s> = <mean_t q_t, mean_s c_s>
        return q.mean(dim=1) @ c.mean(dim=1).T
    out = torch.empty(N, M, device=q.device)
    if strategy == 'diag_max':
        c_t = c.permute(1, 2, 0).contiguous()  # (T, D, M)
        step = max(1, max_elements // (T * M))
        for i in range(0, N, step):
            out[i:i + step] = torch.bmm(q[i:i + step].transpose(0, 1), c_t).amax(dim=0)  # (T, n, M) -> (n, M)
        return out
    c_flat = c.reshape(M * T, D).T  # (D, M*T)  block_max: every frame against every frame
    step = max(1, max_elements // (T * M * T))
    for i in range(0, N, step):
        n = q[i:i + step].shape[0]
        out[i:i + step] = (q[i:i + step].reshape(n * T, D) @ c_flat).view(n, T, M, T).amax(dim=(1, 3))
    return out


def retrieval_metrics(sim):
    """sim (N, N): row i scores query i against every candidate; its true match is candidate i.
    The rank of the true match is 1 + the number of other candidates scoring at least as high, so a
    tie counts against the model. Returns R@1, R@5, R@10 (percent of queries) and the median rank."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f'sim must be square (query i matches candidate i), got {tuple(sim.shape)}')
    if not torch.isfinite(sim).all():
        raise ValueError('sim has NaN or infinite scores')
    ranks = (sim >= sim.diagonal()[:, None]).sum(dim=1)  # (N,), the true match counts itself: 1-based
    metrics = {f'R@{k}': 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    metrics['MedR'] = ranks.double().quantile(0.5).item()  # the mean of the two middle ranks when N is even
    return metrics


def retrieval(features, strategies=('diag_mean',), device='cpu'):
    """{strategy: {'V->A': metrics, 'A->V': metrics}} from extract_features' g_a, g_v (N, T, D), scored
    on device. V->A: visual queries against audio candidates. Every strategy is symmetric, so A->V
    uses the transpose."""
    g_a, g_v = features['g_a'].to(device), features['g_v'].to(device)
    results = {}
    for strategy in strategies:
        sim_va = similarity(g_v, g_a, strategy)  # (N, N) rows: visual queries
        results[strategy] = {'V->A': retrieval_metrics(sim_va), 'A->V': retrieval_metrics(sim_va.T)}
    return results


def print_table(header, rows, left=1):
    """Rows of strings and numbers as an aligned table: floats with one decimal, the first `left`
    columns aligned left, the others right."""
    cells = [[f'{x:.1f}' if isinstance(x, float) else str(x) for x in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print('  '.join(c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print('  '.join('-' * w for w in widths))


# -----------------------------------------------------------------------------
# attention probe

def mean_average_precision(scores, targets):
    """Macro average precision in percent over the classes with at least one positive.
    scores, targets (N, C); a target > 0 is a positive. AP of a class = mean over its positives of
    the precision among clips scoring at least as high as that positive (tied clips share one
    threshold, as in sklearn's average_precision_score)."""
    scores, positive = scores.double(), targets > 0
    if scores.shape != positive.shape or scores.dim() != 2:
        raise ValueError(f'scores and targets must both be (N, C), '
                         f'got {tuple(scores.shape)} and {tuple(targets.shape)}')
    has_pos = positive.any(dim=0)  # (C,)
    if not has_pos.any():
        raise ValueError('no class has a positive: mAP is undefined')
    N = scores.shape[0]
    s, order = scores.sort(dim=0, descending=True)  # (N, C) per class, best first
    pos = positive.gather(0, order).double()  # (N, C)
    true_pos = pos.cumsum(dim=0)  # (N, C) positives among the first i+1
    # last index of each run of tied scores: a tied clip's precision is taken after the whole run
    idx = torch.arange(N, device=s.device)[:, None].expand_as(s)
    run_end = torch.where(torch.cat([s[1:] != s[:-1], torch.ones_like(s[:1], dtype=torch.bool)]), idx, N)
    run_end = run_end.flip(0).cummin(dim=0).values.flip(0)  # (N, C) next run end at or after i
    precision = true_pos.gather(0, run_end) / (run_end + 1)  # (N, C)
    ap = (precision * pos).sum(dim=0)[has_pos] / pos.sum(dim=0)[has_pos]
    return 100.0 * ap.mean().item()


class AttentionProbe(nn.Module):
    """The CAV-MAE Sync probe: a learned CLS token prepended to the T frame vectors (no positional
    embedding), 2 pre-norm transformer layers, LayerNorm, linear head on the CLS output."""

    def __init__(self, dim, num_classes, num_heads=12, depth=2, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'probe width {dim} is not divisible by num_heads={num_heads}')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0, activation='gelu',
                                       batch_first=True, norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x):  # (B, T, dim) -> logits (B, num_classes)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + T, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def probe_inputs(features, modality='av'):
    """Per-clip sequence of frame vectors: [g_a; g_v] (N, T, 2D), or g_a / g_v (N, T, D)."""
    if modality == 'av':
        return torch.cat([features['g_a'], features['g_v']], dim=-1)
    if modality in ('a', 'v'):
        return features['g_' + modality]
    raise ValueError(f"modality must be 'av', 'a' or 'v', got {modality!r}")


@torch.no_grad()
def _probe_scores(probe, x, device, batch_size=256):
    probe.eval()
    return torch.cat([probe(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def probe_metric(logits, targets, multilabel):
    """mAP (percent) of sigmoid scores for multi-label data, else top-1 accuracy (percent)."""
    if multilabel:
        return mean_average_precision(logits.sigmoid(), targets)
    return 100.0 * (logits.argmax(dim=1) == targets.argmax(dim=1)).double().mean().item()


def label_type_from_csv(label_csv):
    """The probe's default task from the dataset's label CSV: 'multi' (BCE, mAP) when every id is an AudioSet
    ontology id (/m/..., /g/..., /t/...: AudioSet and AS-20K are multi-label), else 'single' (cross-entropy,
    top-1: VGGSound's ids, the synthetic set's). Decided by the label set, not by the clips, so a multi-label
    set whose clips happen to carry one label each is still scored by mAP."""
    mid_to_index, _ = data.read_label_csv(label_csv)
    return 'multi' if all(mid.startswith(('/m/', '/g/', '/t/')) for mid in mid_to_index) else 'single'


def class_balanced_weights(labels):
    """Per-clip sampling weights as CAV-MAE's gen_weight_file.py: a class weighs 1000 / (its training clips
    + 0.01), a clip the sum of its classes' weights. labels (N, C), > 0 = positive -> (N,) float64."""
    positive = (labels > 0).double()  # (N, C)
    return positive @ (1000.0 / (positive.sum(dim=0) + 0.01))


def epoch_order(num_clips, gen, weights=None):
    """Training clips of one probe epoch: a permutation, or num_clips draws with replacement in proportion
    to weights (what torch.utils.data.WeightedRandomSampler(weights, num_clips) draws, as the CAV-MAE release)."""
    if weights is None:
        return torch.randperm(num_clips, generator=gen)
    return torch.multinomial(weights, num_clips, replacement=True, generator=gen)


class AugmentedClips(torch.utils.data.Dataset):
    """Input-level augmentation for probing (the CAV-MAE fine-tuning loader's time shift and mixup): the clips
    `order` of an eval-mode AVDataset, position i drawn from (seed, epoch, i) whatever the workers: with
    probability `mixup` a random partner clip, lambda ~ Beta(10, 10), waveforms mixed before the fbank (each
    mean-removed, the partner cut or zero-padded to the clip's length), every frame and the labels mixed
    with the same lambda; then the waveform rolled by up to data.MAX_TIME_SHIFT samples either way (the
    pretraining shift: a segment still matches its frame). Items as the dataset's eval items."""

    def __init__(self, dataset, order, epoch, seed=0, mixup=0.5):
        self.dataset, self.order, self.epoch, self.seed, self.mixup = dataset, order.tolist(), epoch, seed, mixup

    def __len__(self):
        return len(self.order)

    def _load(self, clip):  # -> waveform (n,), frames (T, 3, H, W)
        ds = self.dataset
        frames = [data.load_frame(data.frame_path(clip['video_path'], i, clip['id']), ds.img_size, clip['id'])
                  for i in range(ds.num_frames)]
        return data.load_waveform(clip['wav'], clip['id']), torch.stack(frames)

    def __getitem__(self, pos):
        ds = self.dataset
        rng = np.random.default_rng((self.seed, self.epoch, pos))
        clip = ds.clips[self.order[pos]]
        wav, image = self._load(clip)
        label = data.multi_hot(clip['classes'], ds.num_classes)
        if rng.random() < self.mixup:
            other = ds.clips[int(rng.integers(len(ds)))]
            lam = float(rng.beta(10, 10))
            wav2, image2 = self._load(other)
            wav2 = wav2[:len(wav)] if len(wav2) >= len(wav) else F.pad(wav2, (0, len(wav) - len(wav2)))
            wav = lam * wav + (1 - lam) * wav2
            wav = wav - wav.mean()
            image = lam * image + (1 - lam) * image2
            label = lam * label + (1 - lam) * data.multi_hot(other['classes'], ds.num_classes)
        wav = torch.roll(wav, int(rng.integers(-data.MAX_TIME_SHIFT, data.MAX_TIME_SHIFT + 1)))
        fbank = data.fbank_frames(wav, ds.num_mel_bins)  # (1024, F)
        T = ds.num_frames
        audio = torch.stack([fbank[slice(*data.segment_bounds(i, T, data.TARGET_FRAMES, ds.audio_length))]
                             for i in range(T)])  # (T, L, F)
        return dict(audio=(audio - data.FBANK_MEAN) / data.FBANK_STD, image=image, label=label, id=clip['id'])


def train_probe(train_x, train_y, eval_x, eval_y, multilabel, lr, epochs, batch_size=48, num_heads=12,
                mixup=0.5, wa_start=3, warmup_frac=0.1, min_lr=0.0, weight_decay=5e-7, device='cpu', seed=0,
                balanced=False, epoch_inputs=None):
    """Train an AttentionProbe on frozen features x (N, T, dim), targets y (N, C) multi-hot; report on
    eval_x / eval_y. Adam (0.95, 0.999), linear warmup over warmup_frac of the steps (10%: 1.5 of 15 epochs,
    1 of 10) then cosine down to min_lr, weights averaged over the ends of epochs wa_start..epochs (1-based).
    Each epoch draws N clips: a permutation, or with balanced=True with replacement in proportion to
    class_balanced_weights(train_y). Augmentation: by default mixup of the cached features (a clip is mixed,
    with probability `mixup`, with another of its batch, lambda ~ Beta(10, 10), as CAV-MAE's rate and lambda).
    epoch_inputs: optional function (epoch, order) -> (x (N, T, dim), y (N, C)), the features of the clips
    `order` extracted from augmented inputs (AugmentedClips); the features are then not mixed again.
    Loss: BCE for multi-label data, cross-entropy otherwise. Returns a dict with per-epoch history,
    the metric of the last weights ('last') and of the averaged weights ('final')."""
    if not 1 <= wa_start <= epochs:
        raise ValueError(f'wa_start={wa_start} must lie in 1..epochs={epochs}')
    if not multilabel and (train_y.sum(dim=1) == 0).any():
        raise ValueError('single-label probing needs one label per training clip; some clips have none')
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = class_balanced_weights(train_y) if balanced else None
    train_x, train_y = train_x.to(device), train_y.float().to(device)  # frozen features: moved once
    N, T, dim = train_x.shape
    probe = AttentionProbe(dim, train_y.shape[1], num_heads).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=weight_decay)
    steps_per_epoch = math.ceil(N / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, round(warmup_frac * total))

    def lr_at(step):
        return warmup_cosine(step, total, warmup, lr, min_lr)

    beta = torch.distributions.Beta(torch.tensor(10.0), torch.tensor(10.0))
    metric_name = 'mAP' if multilabel else 'top-1'
    history, wa_sum, wa_count, step = [], None, 0, 0
    for epoch in tqdm(range(1, epochs + 1), desc='probe', unit='epoch', leave=False):
        order, total_loss = epoch_order(N, gen, weights), 0.0
        if epoch_inputs is not None:
            epoch_x, epoch_y = (t.to(device) for t in epoch_inputs(epoch, order))  # (N, T, dim), (N, C)
        probe.train()
        for i in range(0, N, batch_size):
            if epoch_inputs is None:
                idx = order[i:i + batch_size]
                x, y = train_x[idx], train_y[idx]  # (B, T, dim), (B, C)
            else:
                x, y = epoch_x[i:i + batch_size], epoch_y[i:i + batch_size].float()
            B = len(x)
            if mixup > 0 and epoch_inputs is None:  # a clip is mixed, with probability `mixup`, with another one
                lam = torch.where(torch.rand(B, generator=gen) < mixup, beta.sample((B,)), torch.ones(B)).to(device)
                partner = torch.randperm(B, generator=gen).to(device)
                x = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
                y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step)
            logits = probe(x)
            loss = F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * B
            step += 1
        metric = probe_metric(_probe_scores(probe, eval_x, device), eval_y, multilabel)
        history.append(dict(epoch=epoch, lr=lr_at(step - 1), loss=total_loss / N, **{metric_name: metric}))
        if epoch >= wa_start:  # running sum of end-of-epoch weights
            sd = {k: v.detach().clone().float() for k, v in probe.state_dict().items()}
            wa_sum = sd if wa_sum is None else {k: wa_sum[k] + sd[k] for k in sd}
            wa_count += 1
    last = history[-1][metric_name]
    probe.load_state_dict({k: v / wa_count for k, v in wa_sum.items()})
    final = probe_metric(_probe_scores(probe, eval_x, device), eval_y, multilabel)
    return dict(metric=metric_name, multilabel=multilabel, history=history, last=last, final=final,
                wa_epochs=[wa_start, epochs], probe=probe)


# -----------------------------------------------------------------------------
# command line

def cmd_retrieval(args):
    feats = features_for(args, args.data, args.label_csv)
    N, T, D = feats['g_a'].shape
    t0 = time.time()
    results = retrieval(feats, args.strategy, args.device)
    print(f'\nzero-shot retrieval, {N} clips x {T} frames, scored in {time.time() - t0:.2f} s')
    rows = [[s, d, m['R@1'], m['R@5'], m['R@10'], m['MedR']] for s, r in results.items() for d, m in r.items()]
    print_table(['strategy', 'direction', 'R@1', 'R@5', 'R@10', 'MedR'], rows, left=2)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(ckpt=args.ckpt, weights=args.weights, data=args.data, num_clips=N, num_frames=T,
                           results=results), f, indent=2)
        print(f'wrote {args.out}')


def probe_settings(args, train, test):
    """(multilabel, balanced) from --label_type and --balanced: 'auto' takes the task from the label CSV
    (label_type_from_csv) and balances single-label sets only (the TG-DP / CAV-MAE Sync supplements: VGGSound
    class-balanced, AS-20K not). A single-label run on clips with several labels is an error."""
    label_type = label_type_from_csv(args.label_csv) if args.label_type == 'auto' else args.label_type
    if label_type == 'single':
        for name, feats in (('--train', train), ('--eval', test)):
            several = int((feats['labels'].sum(1) > 1).sum())
            if several:
                raise ValueError(f'{name}: {several} clips have several labels, but the probe is single-label '
                                 f'(--label_type {args.label_type}, label CSV {args.label_csv}); '
                                 'use --label_type multi')
    balanced = label_type == 'single' if args.balanced == 'auto' else args.balanced == 'yes'
    return label_type == 'multi', balanced


def augmented_inputs(args, modality):
    """epoch_inputs for train_probe with --augment input: each epoch, the features of that epoch's clips
    re-extracted from inputs augmented by AugmentedClips (time shift and mixup of waveforms and frames)."""
    if getattr(args, 'model', None) is None:
        args.model = load_model(args.ckpt, args.device, args.weights)
    dataset = make_dataset(args.train, args.label_csv, args.model.config, args.num_frames)

    def epoch_inputs(epoch, order):
        clips = AugmentedClips(dataset, order, epoch, args.seed, args.mixup)
        feats = extract_features(args.model, clips, args.batch_size, args.device, args.num_workers)
        return probe_inputs(feats, modality), feats['labels']
    return epoch_inputs


def cmd_probe(args):
    train = features_for(args, args.train, args.label_csv)
    test = features_for(args, args.eval, args.label_csv)
    if train['labels'].shape[1] == 0 or train['labels'].shape[1] != test['labels'].shape[1]:
        raise ValueError(f'--train and --eval need labels from the same --label_csv {args.label_csv}')
    multilabel, balanced = probe_settings(args, train, test)
    # the papers' probing: AS-20K (multi-label) lr 5e-2, 15 epochs; VGGSound (single-label) lr 1e-3, 10 epochs
    lr = args.lr if args.lr is not None else (5e-2 if multilabel else 1e-3)
    epochs = args.epochs if args.epochs is not None else (15 if multilabel else 10)
    num_heads = args.probe_heads or train['model_args']['num_heads']
    x_train, x_eval = probe_inputs(train, args.modality), probe_inputs(test, args.modality)
    print(f"probe: modality {args.modality}, {x_train.shape[0]} train / {x_eval.shape[0]} eval clips x "
          f"{x_train.shape[1]} frames x {x_train.shape[2]}-d, {train['labels'].shape[1]} classes, "
          f"{'multi-label: BCE, mAP' if multilabel else 'single-label: cross-entropy, top-1'}, "
          f"{'class-balanced sampling, ' if balanced else ''}{args.augment}-level mixup {args.mixup:g}, "
          f'lr {lr:g} (warmup {args.warmup_frac:.0%}, cosine to {args.min_lr:g}), {epochs} epochs, '
          f'batch {args.probe_batch_size}, {num_heads} heads')
    epoch_inputs = augmented_inputs(args, args.modality) if args.augment == 'input' else None
    out = train_probe(x_train, train['labels'], x_eval, test['labels'], multilabel, lr, epochs,
                      batch_size=args.probe_batch_size, num_heads=num_heads, mixup=args.mixup,
                      wa_start=args.wa_start, warmup_frac=args.warmup_frac, min_lr=args.min_lr,
                      device=args.device, seed=args.seed, balanced=balanced, epoch_inputs=epoch_inputs)
    metric = out['metric']
    print()
    print_table(['epoch', 'lr', 'train loss', metric],
                [[h['epoch'], f"{h['lr']:.2e}", f"{h['loss']:.4f}", h[metric]] for h in out['history']], left=0)
    print(f"\n{metric}: {out['final']:.1f} with weights averaged over epochs "
          f"{out['wa_epochs'][0]}-{out['wa_epochs'][1]} "
          f"({out['last']:.1f} with the last weights)")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(ckpt=args.ckpt, weights=args.weights, train=args.train, eval=args.eval,
                           modality=args.modality, lr=lr, epochs=epochs, metric=metric, balanced=balanced,
                           augment=args.augment, final=out['final'], last=out['last'], history=out['history']),
                      f, indent=2)
        print(f'wrote {args.out}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--ckpt', required=True, help='train.py checkpoint or official CAV-MAE Sync / TG-DP release')
    common.add_argument('--weights', choices=('model', 'teacher'), default='model',
                        help='train.py checkpoints: student or EMA teacher')
    common.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    common.add_argument('--batch_size', type=int, default=8, help='clips per forward (each with all its frames)')
    common.add_argument('--num_workers', type=int, default=min(4, os.cpu_count() or 1), help='data loading processes')
    common.add_argument('--num_frames', type=int, default=16, help='frames (and aligned segments) per clip')
    cached = argparse.ArgumentParser(add_help=False)
    cached.add_argument('--cache', help='directory for extracted features, reused across runs')

    p = sub.add_parser('retrieval', parents=[common, cached], help='zero-shot V->A and A->V retrieval')
    p.add_argument('--data', required=True, help='dataset JSON')
    p.add_argument('--label_csv', help='only stored with the features')
    p.add_argument('--strategy', nargs='+', choices=STRATEGIES, default=['diag_mean'], help='clip-to-clip scoring')
    p.add_argument('--out', help='results JSON')
    p.set_defaults(run=cmd_retrieval)

    p = sub.add_parser('probe', parents=[common, cached], help='attention probe on frozen features')
    p.add_argument('--train', required=True, help='training dataset JSON')
    p.add_argument('--eval', required=True, help='evaluation dataset JSON')
    p.add_argument('--label_csv', required=True)
    p.add_argument('--modality', choices=('av', 'a', 'v'), default='av')
    p.add_argument('--lr', type=float, help='default: 5e-2 multi-label (AS-20K), 1e-3 single-label (VGGSound)')
    p.add_argument('--epochs', type=int, help='default: 15 multi-label, 10 single-label')
    p.add_argument('--probe_batch_size', type=int, default=48)
    p.add_argument('--probe_heads', type=int, help="default: the encoder's number of heads")
    p.add_argument('--mixup', type=float, default=0.5, help='probability that a clip is mixed with another')
    p.add_argument('--augment', choices=('features', 'input'), default='features',
                   help='features: mixup of the cached features (fast); input: time shift and mixup of the '
                        'waveforms and frames, features re-extracted every epoch (the papers)')
    p.add_argument('--label_type', choices=('auto', 'multi', 'single'), default='auto',
                   help='auto: multi (BCE, mAP) when the label CSV has AudioSet ontology ids, else single (top-1)')
    p.add_argument('--balanced', choices=('auto', 'yes', 'no'), default='auto',
                   help='class-balanced sampling (CAV-MAE gen_weight_file.py weights); auto: single-label sets only')
    p.add_argument('--warmup_frac', type=float, default=0.1, help='linear warmup over this share of the steps')
    p.add_argument('--min_lr', type=float, default=0.0, help='the cosine schedule ends here')
    p.add_argument('--wa_start', type=int, default=3, help='first epoch (1-based) in the weight average')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='results JSON')
    p.set_defaults(run=cmd_probe)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == '__main__':
    main()
