"""
Evaluation with the papers' protocols (TG-DP and CAV-MAE Sync), so that results compare with theirs.

  retrieval  zero-shot clip-to-clip retrieval, V->A and A->V: R@1/5/10 (percent) and median rank on
             the per-frame global tokens after the joint layer (g_a, g_v after norm_a / norm_v)
  probe      frozen encoders, attention probe (CLS + 2 transformer layers) on the T per-frame
             vectors [a; v]: mAP (multi-label, every class) or top-1. Defaults: the releases' probe
             input (--probe_input global) and the papers' recipe (--augment input)

  python evaluate.py retrieval --ckpt out/ckpt.pt --data vgg_retrieval.json --cache feats
  python evaluate.py probe --ckpt out/ckpt.pt --train as20k.json --eval as_eval.json \\
      --label_csv class_labels_indices.csv --cache feats [--augment cached]
"""
import argparse
import dataclasses
import functools
import hashlib
import json
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
from model import (KIND_NAMES, CAVMAESync, ModelConfig, autocast, checkpoint_kind, load_weights,
                   read_checkpoint, warmup_cosine)

STRATEGIES = ('diag_mean', 'block_mean', 'diag_max', 'block_max')
PROBE_INPUTS = ('global', 'patch', 'register', 'joint')


# -----------------------------------------------------------------------------
# model, data and features

def load_model(ckpt_path, device='cpu', weights='model'):
    """A train.py checkpoint or official release -> CAVMAESync in eval mode; 'teacher': the EMA teacher, no decoder."""
    if weights not in ('model', 'teacher'):
        raise ValueError(f"weights must be 'model' or 'teacher', got {weights!r}")
    ckpt = read_checkpoint(ckpt_path)
    try:
        kind = checkpoint_kind(ckpt)
    except ValueError as e:
        raise ValueError(f'{ckpt_path}: {e}') from None
    if kind in ('mae', 'cavmae'):
        raise ValueError(f'{ckpt_path}: {KIND_NAMES[kind]} is an initialisation '
                         '(train.py --init_from), not a model to evaluate')
    config = ModelConfig(**ckpt['model_args']) if kind == 'train' else ModelConfig()
    model = CAVMAESync(config, decoder=(weights == 'model'))
    load_weights(model, ckpt, weights, name=ckpt_path)
    print(f'{ckpt_path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')
    return model.to(device).eval()


def make_dataset(data_json, label_csv, config, num_frames=16):
    """Eval-mode data.AVDataset (all T frames) at the model's sizes; with a CSV, labels required."""
    return data.AVDataset(data_json, label_csv=label_csv, mode='eval',
                          audio_length=config.audio_length, num_mel_bins=config.num_mel_bins,
                          img_size=config.img_size, num_frames=num_frames,
                          require_labels=label_csv is not None)


def frame_vectors(model, audio, image, embedding='joint'):
    """One vector per frame and modality: audio (B, L, F), image (B, 3, H, W) -> a, v (B, D).
      joint     g_a, g_v after the joint layer and norm_a / norm_v (the retrieval embedding)
      global    the encoders' global-token outputs, no joint layer, no LayerNorm: the releases'
                probe input (CAVMAEFT, cls_token=True, runs the joint layer and discards it)
      patch     the mean of the encoders' patch outputs (CAVMAEFT with cls_token=False)
      register  the mean of the encoders' register outputs (CAVMAEFT drops them)"""
    c = model.config
    if embedding == 'joint':
        return model.forward_features(audio, image, tokens=False)[:2]  # g_a, g_v (B, D) each
    lacks = {'global': not c.global_token, 'patch': False, 'register': not c.num_registers}
    if lacks.get(embedding, True):
        raise ValueError(f'--probe_input {embedding!r}: not one of {PROBE_INPUTS} this model has '
                         f'(global_token={c.global_token}, num_registers={c.num_registers})')
    first = int(c.global_token)  # position of the first patch token
    out = []
    for modality, emb in (('a', model.embed_audio(audio)), ('v', model.embed_image(image))):
        x = model.add_tokens(emb, modality)  # the encoder as model.encode runs it, registers kept
        for blk in (model.blocks_a if modality == 'a' else model.blocks_v):
            x = blk(x)  # (B, [1 +] N [+ R], D): no LayerNorm
        N = emb.shape[1]
        tokens = {'global': x[:, :1], 'patch': x[:, first:first + N], 'register': x[:, first + N:]}
        out.append(tokens[embedding].mean(dim=1))  # (B, D)
    return tuple(out)


@torch.no_grad()
def extract_features(model, dataset, batch_size=8, device='cpu', num_workers=0, dtype='float32', embedding='joint'):
    """frame_vectors of every clip (batch_size clips x T frames per forward, autocast to dtype) ->
    dict(g_a, g_v (N, T, D) float32 on CPU, labels (N, C), ids [N], class_names [C], embedding)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate, pin_memory=torch.device(device).type == 'cuda')
    g_a, g_v, labels, ids = [], [], [], []
    for batch in tqdm(loader, desc='features', unit='batch', leave=False):
        audio = batch['audio'].to(device, non_blocking=True)  # (B, T, L, F)
        image = batch['image'].to(device, non_blocking=True)  # (B, T, 3, H, W)
        B, T = audio.shape[:2]
        with autocast(device, dtype):  # a, v: (B*T, D) each
            a, v = frame_vectors(model, audio.flatten(0, 1), image.flatten(0, 1), embedding)
        g_a.append(a.float().view(B, T, -1).cpu())
        g_v.append(v.float().view(B, T, -1).cpu())
        labels.append(batch['label'])
        ids += list(batch['id'])
    model.train(was_training)
    return dict(g_a=torch.cat(g_a), g_v=torch.cat(g_v), labels=torch.cat(labels).float(), ids=ids,
                class_names=list(getattr(dataset, 'class_names', None) or []), embedding=embedding)


def _stamp(path, shards=False):
    """[path, size, mtime] of a file; a shard set (shards=True): those of its shards, index.json."""
    if shards and data.is_shard_set(path):
        paths = [p for p, _ in data.shard_tables(path)]  # shard_tables needs the index.json beside them
        return [_stamp(p) for p in paths + [os.path.join(os.path.dirname(paths[0]), 'index.json')]]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def features_for(ckpt, data_json, label_csv=None, weights='model', embedding='joint', num_frames=16, cache=None,
                 get_model=None, dtype='float32', batch_size=8, device='cpu', num_workers=0):
    """extract_features of ckpt's `weights` on data_json (+ 'model_args'), through the cache
    directory when given (keyed by the files and settings); get_model() only when needed."""
    stamps = [_stamp(ckpt), weights, _stamp(data_json, shards=True),
              _stamp(label_csv) if label_csv else None, num_frames, embedding, dtype]
    path = None
    if cache:
        key = hashlib.sha1(json.dumps(stamps).encode()).hexdigest()[:16]
        stem = re.sub(r'[^\w.-]', '_', os.path.splitext(os.path.basename(data_json.rstrip('/')))[0])
        path = os.path.join(cache, f'{stem}-{key}.pt')  # (a shard pattern's braces replaced)
        if os.path.exists(path):
            print(f'features of {data_json}: cached in {path}')
            return torch.load(path, weights_only=True)
    model = get_model() if get_model else load_model(ckpt, device, weights)
    dataset = make_dataset(data_json, label_csv, model.config, num_frames)
    t0 = time.time()
    feats = extract_features(model, dataset, batch_size, device, num_workers, dtype, embedding)
    feats['model_args'] = dataclasses.asdict(model.config)
    N, T, _ = feats['g_a'].shape
    print(f'features of {data_json}: {N} clips x {T} frames in {time.time() - t0:.1f} s')
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(feats, path)
        print(f'features cached in {path}')
    return feats


# -----------------------------------------------------------------------------
# retrieval

def similarity(query, candidates, strategy='diag_mean', max_elements=2 ** 26):
    """Clip-to-clip scores (N, M) of per-frame embeddings query (N, T, D), candidates (M, T, D):
      diag_mean   mean_t   cos(q_t, c_t)     (the papers' default)
      block_mean  mean_t,s cos(q_t, c_s)
      diag_max    max_t    cos(q_t, c_t)
      block_max   max_t,s  cos(q_t, c_s)
    All four are symmetric. The max strategies run in chunks of at most max_elements frame pairs."""
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
        for i in range(0, N, step):  # scores (T, n, M) -> their max over t (n, M)
            out[i:i + step] = torch.bmm(q[i:i + step].transpose(0, 1), c_t).amax(dim=0)
        return out
    c_flat = c.reshape(M * T, D).T  # (D, M*T)  block_max: every frame against every frame
    step = max(1, max_elements // (T * M * T))
    for i in range(0, N, step):
        n = q[i:i + step].shape[0]
        scores = (q[i:i + step].reshape(n * T, D) @ c_flat).view(n, T, M, T)
        out[i:i + step] = scores.amax(dim=(1, 3))  # (n, M)
    return out


def retrieval_metrics(sim):
    """R@1/5/10 (percent) and median rank of sim (N, N), query i matching candidate i. Rank = 1 +
    the other candidates scoring at least as high (a tie counts against the model)."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f'sim must be square (N, N), got {tuple(sim.shape)}')
    if not torch.isfinite(sim).all():
        raise ValueError('sim has NaN or infinite scores')
    ranks = (sim >= sim.diagonal()[:, None]).sum(dim=1)  # (N,) 1-based: the match counts itself
    metrics = {f'R@{k}': 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    metrics['MedR'] = ranks.double().quantile(0.5).item()  # N even: mean of the two middle ranks
    return metrics


def retrieval(features, strategies=('diag_mean',), device='cpu'):
    """{strategy: {'V->A': metrics, 'A->V': metrics}} of g_a, g_v (N, T, D)."""
    g_a, g_v = features['g_a'].to(device), features['g_v'].to(device)
    results = {}
    for strategy in strategies:
        sim_va = similarity(g_v, g_a, strategy)  # (N, N) rows: visual queries; A->V: the transpose
        results[strategy] = {'V->A': retrieval_metrics(sim_va), 'A->V': retrieval_metrics(sim_va.T)}
    return results


def print_table(header, rows, left=1):
    """Rows as an aligned table: floats with one decimal, the first `left` columns left-aligned."""
    cells = [[f'{x:.1f}' if isinstance(x, float) else str(x) for x in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    cells.insert(1, ['-' * w for w in widths])  # the rule under the header
    for row in cells:
        print('  '.join(c.rjust(w) if i >= left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


# -----------------------------------------------------------------------------
# attention probe

def average_precisions(scores, targets):
    """Per-class AP (C,) of scores, targets (N, C) (> 0: positive) as sklearn's
    average_precision_score (tied clips share a threshold); 0 without positives (as stats.py)."""
    scores, positive = scores.double(), targets > 0
    if scores.shape != positive.shape or scores.dim() != 2:
        raise ValueError(f'scores and targets must both be (N, C), '
                         f'got {tuple(scores.shape)} and {tuple(targets.shape)}')
    N = scores.shape[0]
    s, order = scores.sort(dim=0, descending=True)  # (N, C) per class, best first
    pos = positive.gather(0, order).double()  # (N, C)
    true_pos = pos.cumsum(dim=0)  # (N, C) positives among the first i+1
    # last index of each run of tied scores: a tied clip's precision is taken after the whole run
    idx = torch.arange(N, device=s.device)[:, None].expand_as(s)
    last = torch.cat([s[1:] != s[:-1], torch.ones_like(s[:1], dtype=torch.bool)])
    run_end = torch.where(last, idx, N).flip(0).cummin(dim=0).values.flip(0)  # (N, C) next run end
    precision = true_pos.gather(0, run_end) / (run_end + 1)  # (N, C)
    return (precision * pos).sum(dim=0) / pos.sum(dim=0).clamp(min=1)  # (C,), 0 without positives


class AttentionProbe(nn.Module):
    """The CAV-MAE Sync probe: a learned CLS token prepended to the T frame vectors (no positional
    embedding), 2 pre-norm transformer layers, LayerNorm, linear head on the CLS output."""

    def __init__(self, dim, num_classes, num_heads=12, depth=2, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'probe width {dim} is not divisible by num_heads={num_heads}')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0,
                                     activation='gelu', batch_first=True, norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x):  # (B, T, dim) -> logits (B, num_classes)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + T, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def probe_inputs(features, modality='av'):
    """Per-clip sequence of frame vectors: [a; v] (N, T, 2D), or a / v alone (N, T, D)."""
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
    """Top-1 accuracy (percent), or multi-label: the mAP (percent) of the sigmoid scores over every
    class, one without positives counting 0 (CAV-MAE's stats.py)."""
    if not multilabel:
        return 100.0 * (logits.argmax(dim=1) == targets.argmax(dim=1)).double().mean().item()
    if not (targets > 0).any():
        raise ValueError('no class has a positive: mAP is undefined')
    return 100.0 * average_precisions(logits.sigmoid(), targets).mean().item()


def class_balanced_weights(labels):
    """Per-clip sampling weights (N,) as CAV-MAE's gen_weight_file.py, summed over its classes."""
    positive = (labels > 0).double()  # (N, C)
    return positive @ (1000.0 / (positive.sum(dim=0) + 0.01))


def epoch_order(num_clips, gen, weights=None):
    """One probe epoch's clips: a permutation, or the release's WeightedRandomSampler draws."""
    if weights is None:
        return torch.randperm(num_clips, generator=gen)
    return torch.multinomial(weights, num_clips, replacement=True, generator=gen)


class AugmentedClips(torch.utils.data.Dataset):
    """The papers' probe augmentation at the input (CAV-MAE's fine-tuning mixup, plus a time shift)
    of the clips `order` of an eval-mode AVDataset, item i drawn from (seed, epoch, i): with
    probability `mixup` another clip and lambda ~ Beta(10, 10) mix the waveforms, frames and labels;
    the waveform then rolls by up to data.MAX_TIME_SHIFT (the pretraining shift)."""

    def __init__(self, dataset, order, epoch, seed=0, mixup=0.5):
        self.dataset, self.order, self.epoch, self.seed, self.mixup = dataset, order.tolist(), epoch, seed, mixup

    def __len__(self):
        return len(self.order)

    def __getitem__(self, pos):
        ds, index = self.dataset, self.order[pos]
        rng = np.random.default_rng((self.seed, self.epoch, pos))
        clip = ds.clips[index]
        wav, image = data.eval_inputs(clip, ds.img_size, ds.num_frames)  # (n,), (T, 3, H, W)
        label = data.multi_hot(clip['classes'], ds.num_classes)
        if rng.random() < self.mixup:
            other = ds.clips[(index + rng.integers(1, len(ds))) % len(ds)]  # never the clip itself
            lam = float(rng.beta(10, 10))
            wav2, image2 = data.eval_inputs(other, ds.img_size, ds.num_frames)
            wav2 = F.pad(wav2, (0, len(wav) - len(wav2)))  # cut or zero-padded to wav's length
            wav = lam * wav + (1 - lam) * wav2
            wav = wav - wav.mean()
            image = lam * image + (1 - lam) * image2
            label = lam * label + (1 - lam) * data.multi_hot(other['classes'], ds.num_classes)
        wav = torch.roll(wav, int(rng.integers(-data.MAX_TIME_SHIFT, data.MAX_TIME_SHIFT + 1)))
        audio = data.eval_segments(wav, ds.num_frames, ds.audio_length, ds.num_mel_bins)  # (T, L, F)
        return dict(audio=audio, image=image, label=label, id=clip['id'])


def mixed_cached_batches(train_x, train_y, order, batch_size, mixup, gen, beta):
    """The quick option's batches (x, y) of the clips `order`: mixup with the whole training set."""
    N = len(train_x)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]  # (B,)
        x, y = train_x[idx], train_y[idx]  # (B, T, dim), (B, C)
        if mixup > 0:
            B = len(idx)
            partner = ((idx + torch.randint(1, N, (B,), generator=gen)) % N).to(x.device)  # (B,), never the clip itself
            mixed = torch.rand(B, generator=gen) < mixup
            lam = torch.where(mixed, beta.sample((B,)), torch.ones(B)).to(x.device)  # (B,)
            x = lam[:, None, None] * x + (1 - lam[:, None, None]) * train_x[partner]
            y = lam[:, None] * y + (1 - lam[:, None]) * train_y[partner]
        yield x, y


def train_probe(train_x, train_y, eval_x, eval_y, multilabel, lr, epochs, batch_size=48,
                num_heads=12, mixup=0.5, wa_start=3, warmup_frac=0.1, min_lr=0.0, weight_decay=5e-7,
                device='cpu', seed=0, balanced=False, epoch_inputs=None):
    """An AttentionProbe on frozen features x (N, T, dim), targets y (N, C), scored on eval_x /
    eval_y, weights averaged over the ends of epochs wa_start..epochs (1-based). epoch_inputs(epoch,
    order) -> (x, y) from augmented inputs (the papers' recipe); else mixed_cached_batches."""
    if not 1 <= wa_start <= epochs:
        raise ValueError(f'wa_start={wa_start} must lie in 1..epochs={epochs}')
    if not multilabel and (train_y.sum(dim=1) == 0).any():
        raise ValueError('single-label probing needs a label on every training clip')
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the probe's initialisation and the Beta draws
    weights = class_balanced_weights(train_y) if balanced else None
    if train_x is None and epoch_inputs is None:
        raise ValueError('train_probe needs train_x (cached features) or epoch_inputs')
    train_x = None if train_x is None else train_x.to(device)  # frozen features: moved once
    train_y, N = train_y.float().to(device), len(train_y)
    probe = AttentionProbe(eval_x.shape[-1], train_y.shape[1], num_heads).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=weight_decay)
    total = epochs * -(-N // batch_size)  # optimiser steps
    warmup = max(1, round(warmup_frac * total))
    lr_at = functools.partial(warmup_cosine, total=total, warmup=warmup, start=lr, end=min_lr)
    beta = torch.distributions.Beta(torch.tensor(10.0), torch.tensor(10.0))
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    metric_name = 'mAP' if multilabel else 'top-1'
    history, wa_sum, step = [], None, 0
    for epoch in tqdm(range(1, epochs + 1), desc='probe', unit='epoch', leave=False):
        order = epoch_order(N, gen, weights)
        if epoch_inputs is None:
            batches = mixed_cached_batches(train_x, train_y, order, batch_size, mixup, gen, beta)
        else:  # features of augmented inputs, in the epoch's order: not mixed again
            epoch_x, epoch_y = (t.to(device) for t in epoch_inputs(epoch, order))  # (N, T, dim), y
            batches = zip(epoch_x.split(batch_size), epoch_y.float().split(batch_size))
        probe.train()
        total_loss = 0.0
        for x, y in batches:
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step)
            loss = loss_fn(probe(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(x)
            step += 1
        metric = probe_metric(_probe_scores(probe, eval_x, device), eval_y, multilabel)
        history.append(dict(epoch=epoch, lr=lr_at(step - 1), loss=total_loss / N, **{metric_name: metric}))
        if epoch >= wa_start:  # running sum of end-of-epoch weights
            sd = {k: v.detach().clone().float() for k, v in probe.state_dict().items()}
            wa_sum = sd if wa_sum is None else {k: wa_sum[k] + sd[k] for k in sd}
    probe.load_state_dict({k: v / (epochs - wa_start + 1) for k, v in wa_sum.items()})
    final = probe_metric(_probe_scores(probe, eval_x, device), eval_y, multilabel)
    return dict(metric=metric_name, multilabel=multilabel, history=history, final=final,
                last=history[-1][metric_name], wa_epochs=[wa_start, epochs], probe=probe)


# -----------------------------------------------------------------------------
# command line

def cmd_retrieval(args):
    feats = features_for(args.ckpt, args.data, args.label_csv, args.weights, 'joint', args.num_frames, args.cache,
                         None, args.dtype, args.batch_size, args.device, args.num_workers)
    N, T, D = feats['g_a'].shape
    t0 = time.time()
    results = retrieval(feats, args.strategy, args.device)
    print(f'\nzero-shot retrieval, {N} clips x {T} frames, scored in {time.time() - t0:.2f} s')
    rows = [[s, d, m['R@1'], m['R@5'], m['R@10'], m['MedR']] for s, r in results.items() for d, m in r.items()]
    print_table(['strategy', 'direction', 'R@1', 'R@5', 'R@10', 'MedR'], rows, left=2)
    return dict(ckpt=args.ckpt, weights=args.weights, data=args.data, num_clips=N, num_frames=T,
                dtype=args.dtype, results=results)


def probe_settings(label_csv, label_type, balanced, train_labels, eval_labels):
    """(multilabel, balanced). 'auto': multi-label (BCE, mAP) if every label CSV id is an AudioSet
    ontology id; class-balanced sampling for single-label sets only (VGGSound yes, AS-20K no, as the supplements)."""
    task = label_type
    if label_type == 'auto':
        mids = data.read_label_csv(label_csv)[0]
        task = 'multi' if all(mid.startswith(('/m/', '/g/', '/t/')) for mid in mids) else 'single'
    if task == 'single':
        for name, labels in (('--train', train_labels), ('--eval', eval_labels)):
            several = int((labels.sum(1) > 1).sum())
            if several:
                raise ValueError(f'{name}: {several} clips have several labels, but the probe '
                                 f'is single-label (--label_type {label_type}, label CSV '
                                 f'{label_csv}); use --label_type multi')
    return task == 'multi', task == 'single' if balanced == 'auto' else balanced == 'yes'


def probe_training_split(args, get_model, extract):
    """-> (x_train or None, train labels (N, C), epoch_inputs or None): --augment cached reads the
    cached features of --train; input (the papers' recipe) extracts every epoch's AugmentedClips."""
    if args.augment == 'cached':
        train = features_for(args.ckpt, args.train, args.label_csv, args.weights, args.probe_input,
                             args.num_frames, args.cache, get_model, **extract)
        return probe_inputs(train, args.modality), train['labels'], None
    model = get_model()
    dataset = make_dataset(args.train, args.label_csv, model.config, args.num_frames)
    labels = torch.stack([data.multi_hot(c['classes'], dataset.num_classes) for c in dataset.clips])

    def epoch_inputs(epoch, order):  # train_probe's (x, y) of the epoch's clips
        clips = AugmentedClips(dataset, order, epoch, args.seed, args.mixup)
        feats = extract_features(model, clips, args.batch_size, args.device, args.num_workers,
                                 args.dtype, args.probe_input)
        return probe_inputs(feats, args.modality), feats['labels']
    return None, labels, epoch_inputs


def cmd_probe(args):
    get_model = functools.cache(lambda: load_model(args.ckpt, args.device, args.weights))
    extract = {k: getattr(args, k) for k in ('dtype', 'batch_size', 'device', 'num_workers')}
    test = features_for(args.ckpt, args.eval, args.label_csv, args.weights, args.probe_input,
                        args.num_frames, args.cache, get_model, **extract)
    x_train, train_labels, epoch_inputs = probe_training_split(args, get_model, extract)
    if train_labels.shape[1] == 0 or train_labels.shape[1] != test['labels'].shape[1]:
        raise ValueError(f'--train and --eval need labels of the same --label_csv {args.label_csv}')
    multilabel, balanced = probe_settings(args.label_csv, args.label_type, args.balanced,
                                          train_labels, test['labels'])
    # the papers' probing: AS-20K (multi-label) lr 5e-2, 15 epochs; VGGSound (single-label) 1e-3, 10
    lr = args.lr if args.lr is not None else (5e-2 if multilabel else 1e-3)
    epochs = args.epochs if args.epochs is not None else (15 if multilabel else 10)
    num_heads = args.probe_heads or test['model_args']['num_heads']
    x_eval = probe_inputs(test, args.modality)
    print(f"probe: {args.probe_input} {args.modality} vectors {tuple(x_eval.shape[1:])}, "
          f"{len(train_labels)} / {len(x_eval)} clips, {train_labels.shape[1]} classes, "
          f"{'BCE, mAP' if multilabel else 'cross-entropy, top-1'}, balanced {balanced}, mixup "
          f"{args.mixup:g} of the {'inputs' if epoch_inputs else 'cached features'}, lr {lr:g}, "
          f'{epochs} epochs, batch {args.probe_batch_size}, {num_heads} heads')
    out = train_probe(x_train, train_labels, x_eval, test['labels'], multilabel, lr, epochs,
                      args.probe_batch_size, num_heads, args.mixup, args.wa_start, args.warmup_frac,
                      args.min_lr, device=args.device, seed=args.seed, balanced=balanced,
                      epoch_inputs=epoch_inputs)
    metric, report = out['metric'], {}
    print()
    print_table(['epoch', 'lr', 'train loss', metric],
                [[h['epoch'], f"{h['lr']:.2e}", f"{h['loss']:.4f}", h[metric]]
                 for h in out['history']], left=0)
    print(f"\n{metric}: {out['final']:.1f} with weights averaged over epochs "
          f"{out['wa_epochs'][0]}-{out['wa_epochs'][1]} ({out['last']:.1f} with the last weights)")
    if multilabel:  # and the mAP over the classes with a positive in --eval (the others: AP 0)
        present = (test['labels'] > 0).any(dim=0)  # (C,)
        scores = _probe_scores(out['probe'], x_eval, args.device).sigmoid()  # (N, C)
        aps = average_precisions(scores, test['labels'])  # (C,)
        report = dict(classes=len(present), classes_without_positive=int((~present).sum()),
                      mAP_present=100.0 * aps[present].mean().item())
        print(f"mAP over all {report['classes']} classes (CAV-MAE's stats.py); "
              f"{report['classes_without_positive']} have no positive in --eval and count as AP 0; "
              f"over the {int(present.sum())} with positives: {report['mAP_present']:.1f}")
    return dict(ckpt=args.ckpt, weights=args.weights, train=args.train, eval=args.eval,
                probe_input=args.probe_input, modality=args.modality, lr=lr, epochs=epochs,
                metric=out['metric'], balanced=balanced, augment=args.augment, dtype=args.dtype,
                final=out['final'], last=out['last'], history=out['history'], **report)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--ckpt', required=True, help='train.py checkpoint or official release')
    common.add_argument('--weights', choices=('model', 'teacher'), default='model',
                        help='train.py checkpoints: student or EMA teacher')
    common.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    common.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                        help='autocast precision; default bfloat16 on cuda, float32 elsewhere')
    common.add_argument('--batch_size', type=int, default=8, help='clips per forward, all frames')
    common.add_argument('--num_workers', type=int, default=min(4, os.cpu_count() or 1))
    common.add_argument('--num_frames', type=int, default=16, help='frames (and segments) per clip')
    common.add_argument('--cache', help='directory for extracted features, reused across runs')
    common.add_argument('--out', help='results JSON')
    p = sub.add_parser('retrieval', parents=[common], help='zero-shot V->A and A->V retrieval')
    p.add_argument('--data', required=True, help='dataset JSON or shard set')
    p.add_argument('--label_csv', help='only stored with the features')
    p.add_argument('--strategy', nargs='+', choices=STRATEGIES, default=['diag_mean'])
    p.set_defaults(run=cmd_retrieval)
    p = sub.add_parser('probe', parents=[common], help='attention probe on frozen features')
    p.add_argument('--train', required=True, help='training dataset JSON or shard set')
    p.add_argument('--eval', required=True, help='evaluation dataset JSON or shard set')
    p.add_argument('--label_csv', required=True)
    p.add_argument('--probe_input', choices=PROBE_INPUTS, default='global',
                   help="global: the encoders' global-token outputs (the releases'); patch / "
                        'register: their mean outputs; joint: the retrieval embedding')
    p.add_argument('--modality', choices=('av', 'a', 'v'), default='av')
    p.add_argument('--augment', choices=('input', 'cached'), default='input',
                   help="input: the papers' recipe, time shift and mixup of the clips, features "
                        're-extracted every epoch; cached: quick, mixup of the cached features')
    p.add_argument('--mixup', type=float, default=0.5, help='probability that a clip is mixed')
    p.add_argument('--lr', type=float, help='default: 5e-2 multi-label (AS-20K), 1e-3 single')
    p.add_argument('--epochs', type=int, help='default: 15 multi-label, 10 single-label')
    p.add_argument('--probe_batch_size', type=int, default=48)
    p.add_argument('--probe_heads', type=int, help="default: the encoder's number of heads")
    p.add_argument('--label_type', choices=('auto', 'multi', 'single'), default='auto',
                   help='auto: multi (BCE, mAP) for AudioSet ontology ids, else single (top-1)')
    p.add_argument('--balanced', choices=('auto', 'yes', 'no'), default='auto',
                   help='class-balanced sampling (gen_weight_file.py); auto: single-label only')
    p.add_argument('--warmup_frac', type=float, default=0.1, help='share of steps in linear warmup')
    p.add_argument('--min_lr', type=float, default=0.0, help='the cosine schedule ends here')
    p.add_argument('--wa_start', type=int, default=3, help='first epoch (1-based) averaged')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(run=cmd_probe)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = 'bfloat16' if torch.device(args.device).type == 'cuda' else 'float32'
    results = args.run(args)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
