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

--ckpt: a train.py checkpoint (--weights teacher: its EMA teacher) or an official CAV-MAE Sync /
TG-DP release. Features are extracted with all T frames of a batch of clips in one forward and,
with --cache DIR, stored for the next run.
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
# loading

def load_model(ckpt_path, device='cpu', weights='model'):
    """A train.py checkpoint or an official CAV-MAE Sync / TG-DP state dict -> CAVMAESync in eval
    mode, read by model.read_checkpoint, loaded by model.load_weights (as train.py's init_from).
    weights='teacher': the EMA teacher, built without a decoder so that the load stays strict."""
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


def make_dataset(data_json, label_csv, config, num_frames=16, masks=False):
    """Eval-mode data.AVDataset (all T frames and their segments) of a dataset JSON or shard set at
    the model's input sizes; with a label CSV every clip must carry labels; masks: object masks
    too."""
    return data.AVDataset(data_json, label_csv=label_csv, mode='eval',
                          audio_length=config.audio_length, num_mel_bins=config.num_mel_bins,
                          img_size=config.img_size, num_frames=num_frames,
                          require_labels=label_csv is not None, masks=masks)


# -----------------------------------------------------------------------------
# features

def frame_vectors(model, audio, image, embedding='joint'):
    """One vector per frame and modality: audio (B, L, F), image (B, 3, H, W) -> a, v (B, D).
      joint     g_a, g_v after the joint layer's audio / visual passes and norm_a / norm_v
                (the retrieval embedding)
      global    the modality encoders' global-token outputs, before the joint layer, no LayerNorm:
                the releases' probe input (CAVMAEFT, cls_token=True; it runs the joint layer and
                discards it)
      patch     the mean of the encoders' patch outputs (CAVMAEFT with cls_token=False)
      register  the mean of the encoders' register outputs (CAVMAEFT drops them)"""
    c = model.config
    if embedding == 'joint':
        g_a, g_v, _, _ = model.forward_features(audio, image, tokens=False)  # (B, D) each
        return g_a, g_v
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
def extract_features(model, dataset, batch_size=8, device='cpu', num_workers=0, dtype='float32',
                     embedding='joint'):
    """frame_vectors of every clip, a batch of batch_size clips x T frames per forward, under the
    caller's precision model.autocast(device, dtype). -> dict(g_a, g_v (N, T, D) float32 on CPU (the
    `embedding` vectors), labels (N, C), ids [N], class_names [C], embedding)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=data.collate, pin_memory=torch.device(device).type == 'cuda')
    g_a, g_v, labels, ids = [], [], [], []
    for batch in tqdm(loader, desc='features', unit='batch', leave=False):
        audio = batch['audio'].to(device, non_blocking=True)  # (B, T, L, F)
        image = batch['image'].to(device, non_blocking=True)  # (B, T, 3, H, W)
        B, T = audio.shape[:2]
        with autocast(device, dtype):
            a, v = frame_vectors(model, audio.flatten(0, 1), image.flatten(0, 1),
                                 embedding)  # (B*T, D) each
        g_a.append(a.float().view(B, T, -1).cpu())
        g_v.append(v.float().view(B, T, -1).cpu())
        labels.append(batch['label'])
        ids += list(batch['id'])
    model.train(was_training)
    return dict(g_a=torch.cat(g_a), g_v=torch.cat(g_v), labels=torch.cat(labels).float(), ids=ids,
                class_names=list(getattr(dataset, 'class_names', None) or []), embedding=embedding)


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


def features_for(ckpt, data_json, label_csv=None, weights='model', embedding='joint',
                 num_frames=16, cache=None, get_model=None, dtype='float32', batch_size=8,
                 device='cpu', num_workers=0):
    """extract_features of ckpt's `weights` on data_json (+ 'model_args'), through the cache
    directory when given (the key: the files, weights, embedding, num_frames, dtype). get_model()
    loads the model, only when needed (default load_model(ckpt, device, weights))."""
    stamps = [_file_stamp(ckpt), weights, _data_stamp(data_json),
              _file_stamp(label_csv) if label_csv else None, num_frames, embedding, dtype]
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
    """Clip-to-clip scores (N, M) of per-frame embeddings query (N, T, D), candidates (M, T, D),
    frame t aligned with frame t. With cos the cosine of two frames:
      diag_mean   mean_t   cos(q_t, c_t)     (the papers' default)
      block_mean  mean_t,s cos(q_t, c_s)
      diag_max    max_t    cos(q_t, c_t)
      block_max   max_t,s  cos(q_t, c_s)
    All four are symmetric. The max strategies run in chunks of at most max_elements frame pairs."""
    if strategy not in STRATEGIES:
        raise ValueError(f'unknown strategy {strategy!r}; choose from {STRATEGIES}')
    if query.dim() != 3 or candidates.dim() != 3 or query.shape[1:] != candidates.shape[1:]:
        raise ValueError(f'expected (N, T, D) and (M, T, D), got {tuple(query.shape)} and '
                         f'{tuple(candidates.shape)}')
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
            scores = torch.bmm(q[i:i + step].transpose(0, 1), c_t)  # (T, n, M)
            out[i:i + step] = scores.amax(dim=0)  # (n, M)
        return out
    c_flat = c.reshape(M * T, D).T  # (D, M*T)  block_max: every frame against every frame
    step = max(1, max_elements // (T * M * T))
    for i in range(0, N, step):
        n = q[i:i + step].shape[0]
        scores = (q[i:i + step].reshape(n * T, D) @ c_flat).view(n, T, M, T)
        out[i:i + step] = scores.amax(dim=(1, 3))  # (n, M)
    return out


def retrieval_metrics(sim):
    """sim (N, N): row i scores query i against every candidate, its match is candidate i. Rank = 1
    + the other candidates scoring at least as high (a tie counts against the model) -> R@1/5/10
    (percent of queries), median rank."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f'sim must be square (query i matches candidate i), '
                         f'got {tuple(sim.shape)}')
    if not torch.isfinite(sim).all():
        raise ValueError('sim has NaN or infinite scores')
    ranks = (sim >= sim.diagonal()[:, None]).sum(dim=1)  # (N,) 1-based: the match counts itself
    metrics = {f'R@{k}': 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    metrics['MedR'] = ranks.double().quantile(0.5).item()  # N even: mean of the two middle ranks
    return metrics


def retrieval(features, strategies=('diag_mean',), device='cpu'):
    """{strategy: {'V->A': metrics, 'A->V': metrics}} of g_a, g_v (N, T, D) scored on device (V->A:
    visual queries; A->V the transpose, every strategy being symmetric)."""
    g_a, g_v = features['g_a'].to(device), features['g_v'].to(device)
    results = {}
    for strategy in strategies:
        sim_va = similarity(g_v, g_a, strategy)  # (N, N) rows: visual queries
        results[strategy] = {'V->A': retrieval_metrics(sim_va), 'A->V': retrieval_metrics(sim_va.T)}
    return results


def print_table(header, rows, left=1):
    """Rows as an aligned table: floats with one decimal, the first `left` columns left-aligned."""
    cells = [[f'{x:.1f}' if isinstance(x, float) else str(x) for x in row]
             for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print('  '.join(c.rjust(w) if i >= left else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print('  '.join('-' * w for w in widths))


# -----------------------------------------------------------------------------
# attention probe

def average_precisions(scores, targets):
    """Per-class AP (C,) of scores, targets (N, C) (> 0: positive), sklearn's
    average_precision_score: the mean over a class's positives of the precision among clips scoring
    at least as high (tied clips share a threshold). A class without positives gets 0 (CAV-MAE's
    stats.py)."""
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


def mean_average_precision(scores, targets):
    """mAP in percent over every class, one without positives counting 0 (CAV-MAE's stats.py); on an
    eval set lacking some classes it is below the mean over the classes present (probe prints
    both)."""
    if not (targets > 0).any():
        raise ValueError('no class has a positive: mAP is undefined')
    return 100.0 * average_precisions(scores, targets).mean().item()


class AttentionProbe(nn.Module):
    """The CAV-MAE Sync probe: a learned CLS token prepended to the T frame vectors (no positional
    embedding), 2 pre-norm transformer layers, LayerNorm, linear head on the CLS output."""

    def __init__(self, dim, num_classes, num_heads=12, depth=2, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'probe width {dim} is not divisible by num_heads={num_heads}')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0,
                                       activation='gelu', batch_first=True, norm_first=True)
            for _ in range(depth)])
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
    return torch.cat([probe(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def probe_metric(logits, targets, multilabel):
    """mAP (percent) of sigmoid scores for multi-label data, else top-1 accuracy (percent)."""
    if multilabel:
        return mean_average_precision(logits.sigmoid(), targets)
    return 100.0 * (logits.argmax(dim=1) == targets.argmax(dim=1)).double().mean().item()


def label_type_from_csv(label_csv):
    """'multi' (BCE, mAP) when every id of the label CSV is an AudioSet ontology id (/m/, /g/, /t/),
    else 'single' (cross-entropy, top-1): the label set decides, not the clips' label counts."""
    mid_to_index, _ = data.read_label_csv(label_csv)
    audioset = all(mid.startswith(('/m/', '/g/', '/t/')) for mid in mid_to_index)
    return 'multi' if audioset else 'single'


def class_balanced_weights(labels):
    """Per-clip sampling weights as CAV-MAE's gen_weight_file.py: a class weighs 1000 / (its clips +
    0.01), a clip the sum of its classes'. labels (N, C), > 0 = positive -> (N,) float64."""
    positive = (labels > 0).double()  # (N, C)
    return positive @ (1000.0 / (positive.sum(dim=0) + 0.01))


def epoch_order(num_clips, gen, weights=None):
    """One probe epoch's clips: a permutation, or num_clips draws with replacement in proportion to
    weights (WeightedRandomSampler(weights, num_clips)'s draws, as the CAV-MAE release)."""
    if weights is None:
        return torch.randperm(num_clips, generator=gen)
    return torch.multinomial(weights, num_clips, replacement=True, generator=gen)


def other_clip(index, num_clips, draw):
    """A mixup partner, uniform over the other clips (never the clip itself: that would be no
    mixup); draw(low, high) returns integers in [low, high)."""
    return (index + draw(1, num_clips)) % num_clips


class AugmentedClips(torch.utils.data.Dataset):
    """The papers' probe augmentation at the input (CAV-MAE's fine-tuning mixup, plus a time shift)
    of the clips `order` of an eval-mode AVDataset (files or shards), item i drawn from (seed,
    epoch, i): with probability `mixup` a partner (other_clip) and lambda ~ Beta(10, 10) mix the
    mean-removed waveforms (the partner cut or zero-padded to the clip's length; the mix
    mean-removed), every frame and the labels; then the waveform rolls by up to data.MAX_TIME_SHIFT
    samples (the pretraining shift: segments stay with their frames). Built by AVDataset's
    data.eval_inputs / data.eval_segments."""

    def __init__(self, dataset, order, epoch, seed=0, mixup=0.5):
        self.dataset, self.order, self.epoch = dataset, order.tolist(), epoch
        self.seed, self.mixup = seed, mixup

    def __len__(self):
        return len(self.order)

    def __getitem__(self, pos):
        ds, index = self.dataset, self.order[pos]
        rng = np.random.default_rng((self.seed, self.epoch, pos))
        clip = ds.clips[index]
        wav, image = data.eval_inputs(clip, ds.img_size, ds.num_frames)  # (n,), (T, 3, H, W)
        label = data.multi_hot(clip['classes'], ds.num_classes)
        if rng.random() < self.mixup:
            other = ds.clips[other_clip(index, len(ds), rng.integers)]
            lam = float(rng.beta(10, 10))
            wav2, image2 = data.eval_inputs(other, ds.img_size, ds.num_frames)
            n = len(wav)
            wav2 = wav2[:n] if len(wav2) >= n else F.pad(wav2, (0, n - len(wav2)))
            wav = lam * wav + (1 - lam) * wav2
            wav = wav - wav.mean()
            image = lam * image + (1 - lam) * image2
            label = lam * label + (1 - lam) * data.multi_hot(other['classes'], ds.num_classes)
        wav = torch.roll(wav, int(rng.integers(-data.MAX_TIME_SHIFT, data.MAX_TIME_SHIFT + 1)))
        audio = data.eval_segments(wav, ds.num_frames, ds.audio_length,
                                   ds.num_mel_bins)  # (T, L, F)
        return dict(audio=audio, image=image, label=label, id=clip['id'])


def mixed_cached_batches(train_x, train_y, order, batch_size, mixup, gen, beta):
    """The quick option's batches (x (B, T, dim), y (B, C)) of the clips `order`: each mixed with
    probability `mixup` with a partner from the whole training set (other_clip), lambda ~ Beta(10,
    10)."""
    N = len(train_x)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]  # (B,)
        x, y = train_x[idx], train_y[idx]  # (B, T, dim), (B, C)
        if mixup > 0:
            B = len(idx)
            partner = other_clip(idx, N, lambda lo, hi: torch.randint(lo, hi, (B,), generator=gen))
            partner = partner.to(x.device)  # (B,)
            mixed = torch.rand(B, generator=gen) < mixup
            lam = torch.where(mixed, beta.sample((B,)), torch.ones(B)).to(x.device)  # (B,)
            x = lam[:, None, None] * x + (1 - lam[:, None, None]) * train_x[partner]
            y = lam[:, None] * y + (1 - lam[:, None]) * train_y[partner]
        yield x, y


def probe_steps(probe, optimizer, loss_fn, batches, lr_at, step):
    """One epoch of optimiser steps on batches (x, y), lr_at(step) at each -> (loss sum, next
    step)."""
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
    return total_loss, step


def train_probe(train_x, train_y, eval_x, eval_y, multilabel, lr, epochs, batch_size=48,
                num_heads=12, mixup=0.5, wa_start=3, warmup_frac=0.1, min_lr=0.0, weight_decay=5e-7,
                device='cpu', seed=0, balanced=False, epoch_inputs=None):
    """An AttentionProbe on frozen features x (N, T, dim), targets y (N, C), scored on eval_x /
    eval_y: Adam (0.95, 0.999), linear warmup over warmup_frac of the steps then cosine to min_lr,
    weights averaged over the ends of epochs wa_start..epochs (1-based), BCE (multi-label) or
    cross-entropy. An epoch draws N clips (epoch_order; balanced: class_balanced_weights).
    epoch_inputs(epoch, order) -> (x, y) of those clips from augmented inputs (augmented_inputs, the
    papers' recipe; train_x may be None); without it, the quick option mixed_cached_batches. ->
    dict(history, last, final, ...)."""
    if not 1 <= wa_start <= epochs:
        raise ValueError(f'wa_start={wa_start} must lie in 1..epochs={epochs}')
    if not multilabel and (train_y.sum(dim=1) == 0).any():
        raise ValueError('single-label probing needs one label per training clip; '
                         'some clips have none')
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the probe's initialisation and the Beta draws
    weights = class_balanced_weights(train_y) if balanced else None
    if train_x is None and epoch_inputs is None:
        raise ValueError('train_probe needs train_x (cached features) or epoch_inputs')
    if train_x is not None:
        train_x = train_x.to(device)  # frozen features: moved once
    train_y, N = train_y.float().to(device), len(train_y)
    probe = AttentionProbe(eval_x.shape[-1], train_y.shape[1], num_heads).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, betas=(0.95, 0.999),
                                 weight_decay=weight_decay)
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
        total_loss, step = probe_steps(probe, optimizer, loss_fn, batches, lr_at, step)
        metric = probe_metric(_probe_scores(probe, eval_x, device), eval_y, multilabel)
        history.append(dict(epoch=epoch, lr=lr_at(step - 1), loss=total_loss / N,
                            **{metric_name: metric}))
        if epoch >= wa_start:  # running sum of end-of-epoch weights
            sd = {k: v.detach().clone().float() for k, v in probe.state_dict().items()}
            wa_sum = sd if wa_sum is None else {k: wa_sum[k] + sd[k] for k in sd}
    probe.load_state_dict({k: v / (epochs - wa_start + 1) for k, v in wa_sum.items()})
    final = probe_metric(_probe_scores(probe, eval_x, device), eval_y, multilabel)
    return dict(metric=metric_name, multilabel=multilabel, history=history, final=final,
                last=history[-1][metric_name], wa_epochs=[wa_start, epochs], probe=probe)


def augmented_inputs(model, dataset, modality='av', embedding='global', seed=0, mixup=0.5,
                     dtype='float32', batch_size=8, device='cpu', num_workers=0):
    """train_probe's epoch_inputs for the papers' recipe: every epoch, the features of its clips of
    `dataset` (eval-mode AVDataset) re-extracted from AugmentedClips."""
    def epoch_inputs(epoch, order):
        clips = AugmentedClips(dataset, order, epoch, seed, mixup)
        feats = extract_features(model, clips, batch_size, device, num_workers, dtype, embedding)
        return probe_inputs(feats, modality), feats['labels']
    return epoch_inputs


# =============================================================================
# Tools: pictures, localisation metrics, the supplement's figures, the ablation table, the command line.
# The core above (loading, features, retrieval, probing) is what the papers' numbers come from.
# -----------------------------------------------------------------------------
# pictures (Pillow only)

# anchor colours of two perceptual colour maps, linearly interpolated
TURBO = [(48, 18, 59), (70, 134, 251), (27, 229, 181), (164, 252, 60), (251, 185, 56), (228, 70, 10), (122, 4, 3)]
MAGMA = [(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)]
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # tab10
PAD, HEADER = 4, 16  # reconstruct grid: pixels between cells, height of the column titles
MASK_GREY = 128


def colormap(x, anchors):
    """x (H, W) in [0, 1] -> (H, W, 3) uint8 numpy array."""
    lut = torch.tensor(anchors, dtype=torch.float32)  # (K, 3)
    pos = x.float().clamp(0, 1) * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return ((1 - frac) * lut[lo] + frac * lut[lo + 1]).round().byte().numpy()


def _unit_range(x, lo=None, hi=None):  # min-max scale to [0, 1] (a constant input maps to 0)
    lo = x.min() if lo is None else lo
    hi = x.max() if hi is None else hi
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def frame_to_rgb(image):
    """Normalised frame (3, H, W) -> (H, W, 3) uint8, undoing data.py's ImageNet normalisation."""
    mean = torch.tensor(data.IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(data.IMAGE_STD, dtype=torch.float32)[:, None, None]
    rgb = (image.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0) * 255).round().byte().numpy()


def spectrogram_to_rgb(audio, lo=None, hi=None):
    """Segment (L, F) -> (F, L, 3) uint8: time left to right, low frequencies at the bottom."""
    x = audio.float().cpu().T.flip(0)  # (F, L)
    return colormap(_unit_range(x, lo, hi), MAGMA)


def _loader(dataset, num_clips, batch_size, num_workers):
    subset = Subset(dataset, range(min(num_clips, len(dataset))))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=data.collate)


def _safe_name(clip_id):
    return ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in str(clip_id))


def localize_scale(H, W, display=224):
    """Integer enlargement of localisation panels so that each is at least `display` pixels wide or high."""
    return max(1, math.ceil(display / max(H, W)))


def localization_map(model, audio, image):
    """Sound-prompted localisation map: cos(g_a, visual patch token) per patch, bilinearly upsampled
    to the frame. audio (B, L, F), image (B, 3, H, W) -> (B, H, W) float32 in [-1, 1]."""
    with autocast(audio.device):
        g_a, _, _, tokens_v = model.forward_features(audio, image)
    cos = F.cosine_similarity(g_a.float()[:, None], tokens_v.float(), dim=-1)  # (B, Nv)
    H, W = image.shape[-2:]
    return F.interpolate(cos.view(-1, 1, *model.grid_v), size=(H, W), mode='bilinear', align_corners=False)[:, 0]


def mask_outline(mask):
    """(H, W) bool -> (H, W) bool: the mask's pixels with one of their 8 neighbours outside it (or off the frame)."""
    m = F.pad(mask[None, None].float(), (1, 1, 1, 1))  # (1, 1, H + 2, W + 2), outside = 0
    inner = -F.max_pool2d(-m, 3, stride=1)[0, 0]  # (H, W) erosion: 1 where the whole 3x3 neighbourhood is inside
    return mask & (inner < 0.5)


@torch.no_grad()
def localize(model, dataset, out_dir, frame=None, num_clips=16, batch_size=8, device='cpu', num_workers=0, alpha=0.5):
    """Sound-prompted localisation: for frame t (middle by default) of each clip, the cosine between
    g_a of segment t and every visual patch token of frame t, bilinearly upsampled to the frame,
    min-max scaled per frame (red = most similar) and overlaid on it; where the dataset gives masks,
    the sounding object's outline is drawn in white on the overlay. Writes out_dir/<id>.png =
    [frame | heat map overlay], (2W, H) enlarged by localize_scale. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for batch in tqdm(_loader(dataset, num_clips, batch_size, num_workers), desc='localize', leave=False):
        T = batch['audio'].shape[1]
        t = T // 2 if frame is None else frame
        if not 0 <= t < T:
            raise ValueError(f'--frame {t} is outside 0..{T - 1}')
        audio, image = batch['audio'][:, t].to(device), batch['image'][:, t].to(device)  # (B, L, F), (B, 3, H, W)
        heat = localization_map(model, audio, image)  # (B, H, W)
        H, W = image.shape[-2:]
        for b, clip_id in enumerate(batch['id']):
            rgb = frame_to_rgb(image[b])  # (H, W, 3)
            hot = colormap(_unit_range(heat[b].cpu()), TURBO)
            overlay = (rgb * (1 - alpha) + hot * alpha).round().astype(np.uint8)
            if 'mask' in batch:
                overlay[mask_outline(batch['mask'][b, t]).numpy()] = 255
            canvas = Image.new('RGB', (2 * W, H))
            canvas.paste(Image.fromarray(rgb), (0, 0))
            canvas.paste(Image.fromarray(overlay), (W, 0))
            s = localize_scale(H, W)  # small frames are enlarged so that a person can see them
            paths.append(os.path.join(out_dir, _safe_name(clip_id) + '.png'))
            canvas.resize((2 * W * s, H * s), Image.BICUBIC).save(paths[-1])
    return paths


# Sound-source localisation metrics as on Flickr-SoundNet / VGG-SS, with the conventions of the LVS
# (Chen et al., CVPR 2021) and EZ-VSL (Mo & Morgado, ECCV 2022) evaluation code: the map is min-max
# normalised, the pixels at or above its median value are the prediction P, and against the
# ground truth G, cIoU = |P and G| / (|G| + |P without G|) (the IoU for a binary G). Reported: the
# share of frames with cIoU >= 0.5 ("cIoU" / AP50 in those papers), the area under that share as a
# function of the threshold 0, 0.05, ..., 1 (trapezoids: "AUC"), the mean cIoU, and the pointing game
# (the map's maximum falls inside G; exact mask, no tolerance).
AUC_THRESHOLDS = [0.05 * i for i in range(21)]


def centre_prior(H, W):
    """(H, W) map of the centre-prior baseline: minus the distance to the frame centre."""
    y = torch.arange(H, dtype=torch.float32)[:, None] - (H - 1) / 2
    x = torch.arange(W, dtype=torch.float32)[None] - (W - 1) / 2
    return -(x ** 2 + y ** 2).sqrt()


def ciou(heat, gt, top=0.5):
    """cIoU of one map heat (H, W) against a ground truth gt (H, W), bool or consensus weights in [0, 1].
    The prediction is the pixels at or above the value of rank int(HW (1 - top)) in ascending order:
    about the `top` share of the frame (0.5, the median, in the LVS / EZ-VSL code). With a binary G
    inside P, cIoU = |G| / |P|: it cannot exceed (object share) / top."""
    heat, gt = heat.double().flatten(), gt.double().flatten()
    heat = _unit_range(heat)
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
    auc = sum((AUC_THRESHOLDS[i + 1] - AUC_THRESHOLDS[i]) * (success[i] + success[i + 1]) / 2 for i in range(20))
    return {'cIoU@0.5': 100.0 * float((c >= 0.5).mean()), 'AUC': 100.0 * auc, 'mean cIoU': 100.0 * float(c.mean()),
            'pointing': 100.0 * float(np.mean(hits)), 'frames': int(len(c))}


@torch.no_grad()
def localization_scores(model, dataset, batch_size=8, device='cpu', num_workers=0, num_clips=None, top=0.5):
    """Localisation metrics of the model and of the centre prior over every frame (of the first
    num_clips clips) whose mask file exists and is not empty; dataset: eval mode with masks=True;
    top: the share of the frame predicted for cIoU (ciou).
    Returns {'model': summary, 'centre prior': summary, 'skipped': {...}, 'per_frame': [...]}."""
    scores = {'model': ([], []), 'centre prior': ([], [])}
    per_frame, no_file, empty = [], 0, 0
    loader = _loader(dataset, num_clips or len(dataset), batch_size, num_workers)
    for batch in tqdm(loader, desc='localisation metrics', leave=False):
        has, mask = batch['has_mask'], batch['mask']  # (B, T), (B, T, H, W)
        no_file += int((~has).sum())
        use = has & mask.flatten(2).any(dim=2)  # (B, T)
        empty += int((has & ~use).sum())
        if not use.any():
            continue
        b_idx, t_idx = use.nonzero(as_tuple=True)
        heat = localization_map(model, batch['audio'][b_idx, t_idx].to(device),
                                batch['image'][b_idx, t_idx].to(device)).cpu()  # (n, H, W)
        prior = centre_prior(*heat.shape[-2:])
        for k, (b, t) in enumerate(zip(b_idx.tolist(), t_idx.tolist())):
            gt = mask[b, t]
            row = {'id': batch['id'][b], 'frame': t}
            for name, h in (('model', heat[k]), ('centre prior', prior)):
                c, hit = ciou(h, gt, top), pointing_hit(h, gt)
                scores[name][0].append(c)
                scores[name][1].append(hit)
                row[name] = {'cIoU': c, 'hit': hit}
            per_frame.append(row)
    if not per_frame:
        raise ValueError(f'no frame has a non-empty mask ({no_file} frames without a mask file, {empty} with an '
                         f'empty one); masks are 8-bit PNGs at {{video_path}}/mask_{{i}}/{{video_id}}.png')
    out = {name: localization_summary(*s) for name, s in scores.items()}
    out['skipped'] = {'no mask file': no_file, 'empty mask': empty}
    out['per_frame'] = per_frame
    return out


def keep_overlap(keep, groups, num_patches):
    """Mean Jaccard overlap |K_i & K_j| / |K_i | K_j| of the kept patch sets keep (n, k) over the pairs
    (i, j) with groups[i] != groups[j] (frames of different clips)."""
    hot = torch.zeros(keep.shape[0], num_patches).scatter_(1, keep.cpu(), 1.0)  # (n, N)
    total, pairs = 0.0, 0
    for i in range(0, len(hot), 1024):  # 1024 rows of the (n, n) pair matrix at a time
        inter = hot[i:i + 1024] @ hot.T  # (c, n)
        other = groups[i:i + 1024, None] != groups[None, :]
        total += float((inter / (2 * keep.shape[1] - inter))[other].sum())
        pairs += int(other.sum())
    return total / pairs


@torch.no_grad()
def view_scores(model, dataset, mask_ratio=0.5, batch_size=8, device='cpu', num_workers=0, num_clips=None, seed=0):
    """What each contrastive view of TG-DP shows the student, from a teacher (load_model(weights='teacher'))
    on every frame of the first num_clips clips; dataset: eval mode, masks=True adds the object measure.
    Per masking in masking.CONTRASTIVE_MASKINGS and modality: 'priority' the teacher priority mass the kept
    patches hold (a uniform priority gives 1 - mask_ratio), 'overlap' keep_overlap across clips; visual
    'object' the share of the sounding object's pixels inside kept patches (frames with a non-empty mask).
    Returns {masking: {'a': {...}, 'v': {...}}} with values in percent."""
    gen = torch.Generator().manual_seed(seed)
    raw = {'a': [], 'v': []}
    objects, groups = [], []
    for n, batch in enumerate(tqdm(_loader(dataset, num_clips or len(dataset), batch_size, num_workers),
                                   desc='teacher views', leave=False)):
        B, T = batch['audio'].shape[:2]
        with autocast(device):
            _, _, p_a, p_v = model.forward_teacher(batch['audio'].flatten(0, 1).to(device),
                                                   batch['image'].flatten(0, 1).to(device), normalize=False)
        raw['a'].append(p_a.float().cpu())
        raw['v'].append(p_v.float().cpu())
        groups.append(torch.arange(B).repeat_interleave(T) + n * batch_size)
        if 'mask' in batch:
            p = model.config.patch_size
            m = batch['mask'].flatten(0, 1).float()  # (B T, H, W)
            objects.append(m.unfold(1, p, p).unfold(2, p, p).sum((-1, -2)).flatten(1))  # (B T, Nv) pixels per patch
    groups = torch.cat(groups)
    objects = torch.cat(objects) if objects else None
    has = objects.sum(1) > 0 if objects is not None else torch.zeros(0, dtype=torch.bool)  # frames with an object
    out = {}
    for method in masking.CONTRASTIVE_MASKINGS:
        out[method] = {}
        for modality in ('a', 'v'):
            priority = torch.cat(raw[modality])  # (n, N)
            noise = torch.rand(priority.shape, generator=gen)
            normalized = priority / priority.sum(dim=1, keepdim=True)
            keep = masking.contrastive_keep(method, priority if method == 'gumbel' else normalized, mask_ratio, noise)
            s = dict(priority=100 * float(normalized.gather(1, keep).sum(1).mean()),
                     overlap=100 * keep_overlap(keep, groups, priority.shape[1]))
            if modality == 'v' and has.any():
                s['object'] = 100 * float((objects.gather(1, keep).sum(1)[has] / objects.sum(1)[has]).mean())
            out[method][modality] = s
    return out


def reconstruct_size(config, num_clips):
    """(width, height) of the reconstruct grid: 3 columns; per clip a spectrogram row and a frame row."""
    cell_w = max(config.audio_length, config.img_size)
    return 3 * cell_w + 4 * PAD, HEADER + num_clips * (config.num_mel_bins + config.img_size + 2 * PAD) + PAD


@torch.no_grad()
def reconstruct(model, dataset, out_path, frame=None, num_clips=4, mask_ratio=0.75, device='cpu', seed=0):
    """MAE-style figure for the first num_clips clips (frame t, middle by default): columns original /
    masked (masked patches grey) / reconstruction (predicted masked patches + visible ones), a
    spectrogram row and a frame row per clip. Writes one PNG of reconstruct_size(config, n)."""
    if not getattr(model, 'has_decoder', True):
        raise ValueError('reconstruct needs the decoder: use --weights model (the teacher has none)')
    items = [dataset[i] for i in range(min(num_clips, len(dataset)))]
    batch = data.collate(items)
    T = batch['audio'].shape[1]
    t = T // 2 if frame is None else frame
    if not 0 <= t < T:
        raise ValueError(f'--frame {t} is outside 0..{T - 1}')
    audio, image = batch['audio'][:, t].to(device), batch['image'][:, t].to(device)
    torch.manual_seed(seed)  # the random masks
    with autocast(device):
        out = model.forward_reconstruction(audio, image, mask_ratio, mask_ratio)
    columns = []
    for x, pred, mask, patchify, unpatchify in (
            (audio, out['pred_a'], out['mask_a'], model.patchify_audio, model.unpatchify_audio),
            (image, out['pred_v'], out['mask_v'], model.patchify_image, model.unpatchify_image)):
        target, pred, mask = patchify(x.float()), pred.float(), mask.float()[..., None]  # (B, N, P), (B, N, 1)
        if model.config.norm_pix_loss:  # predictions are per-patch normalised: back to input units
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        columns.append((x.float(), unpatchify(target * (1 - mask)), unpatchify(pred * mask + target * (1 - mask)),
                        unpatchify(mask.expand_as(target)) > 0.5))
    (a_orig, a_masked, a_rec, a_hole), (v_orig, v_masked, v_rec, v_hole) = columns

    W, H = reconstruct_size(model.config, len(items))
    cell_w = max(model.config.audio_length, model.config.img_size)
    canvas = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, title in enumerate(('original', f'masked {mask_ratio:.0%}', 'reconstruction + visible')):
        draw.text((PAD + j * (cell_w + PAD) + 2, 2), title, fill='black', font=font)
    y = HEADER
    for b in range(len(items)):
        lo, hi = a_orig[b].min(), a_orig[b].max()  # one colour scale for the three spectrograms
        for j, (spec, hole) in enumerate(((a_orig[b], None), (a_masked[b], a_hole[b]), (a_rec[b], None))):
            rgb = spectrogram_to_rgb(spec, lo, hi)
            if hole is not None:
                rgb[hole.cpu().T.flip(0).numpy()] = MASK_GREY
            canvas.paste(Image.fromarray(rgb), (PAD + j * (cell_w + PAD), y))
        y += model.config.num_mel_bins + PAD
        for j, (img, hole) in enumerate(((v_orig[b], None), (v_masked[b], v_hole[b]), (v_rec[b], None))):
            rgb = frame_to_rgb(img)
            if hole is not None:
                rgb[hole[0].cpu().numpy()] = MASK_GREY
            canvas.paste(Image.fromarray(rgb), (PAD + j * (cell_w + PAD), y))
        y += model.config.img_size + PAD
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return out_path


def clip_embeddings(g):
    """(N, T, D) per-frame embeddings -> (N, D) clip embeddings: mean of the L2-normalised frames."""
    return F.normalize(F.normalize(g.float(), dim=-1).mean(dim=1), dim=-1)


def class_colour(k):
    if k < len(PALETTE):
        return PALETTE[k]
    h = (k * 0.618033988749895) % 1.0  # golden-ratio hues beyond the ten fixed colours
    i, f = int(h * 6), h * 6 - int(h * 6)
    p, q, t = 0.25, 0.9 - 0.65 * f, 0.25 + 0.65 * f
    r, g, b = [(0.9, t, p), (q, 0.9, p), (p, 0.9, t), (p, q, 0.9), (t, p, 0.9), (0.9, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def clip_classes(features):
    """Class of each clip: its first label (-1 without labels)."""
    labels = features['labels']
    N = features['g_a'].shape[0]
    if not labels.numel():
        return [-1] * N
    return [c if labels[i, c] > 0 else -1 for i, c in enumerate(labels.argmax(dim=1).tolist())]


def top_classes(cls, max_classes):
    """Indices of the clips whose class is among the max_classes most frequent (ties: lower class id)."""
    counts = {}
    for c in cls:
        if c >= 0:
            counts[c] = counts.get(c, 0) + 1
    if not counts:  # no labels: every clip (drawn grey)
        return list(range(len(cls)))
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:max_classes])
    return [i for i, c in enumerate(cls) if c in keep]


def tsne_conditional(X, perplexity=30.0, tol=1e-5, max_steps=200):
    """Rows p_{j|i} (N, N) of t-SNE's input affinities for points X (N, D): a Gaussian per point whose
    precision is found by bisection so that the row's entropy is log(perplexity) (nats)."""
    X = X.double()
    N = X.shape[0]
    if not 1 <= perplexity < N - 1:
        raise ValueError(f't-SNE perplexity must lie in [1, {N - 1}) for {N} points, got {perplexity}')
    D = torch.cdist(X, X).square()  # (N, N)
    off = ~torch.eye(N, dtype=torch.bool)
    D = D - D.masked_fill(~off, float('inf')).min(dim=1, keepdim=True).values  # nearest neighbour at 0: no underflow
    D = D.masked_fill(~off, 0.0)
    beta, lo = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)  # precision, lower bound
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


def tsne(X, perplexity=30.0, iters=1000, seed=0, exaggeration=12.0, exaggeration_iters=250, learning_rate=None):
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
    Y = Y + 1e-6 * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
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


def embedding_coords(features, method='pca', keep=None, perplexity=30.0, seed=0, centre=None):
    """2-D map of the clip-level audio and visual embeddings of the clips `keep` (default all):
    (xy (2n, 2): audio rows then visual rows, (x label, y label), title).
    pca: fit jointly after centring each modality (otherwise the offset between the modalities takes
    the first component and hides the classes); tsne: on the unit-normalised embeddings as they are,
    so that a gap between the modalities shows (centre=True: each modality centred first, as pca)."""
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


def _marker(draw, x, y, r, shape, colour):
    outline = tuple(int(c * 0.6) for c in colour)
    if shape == 'circle':
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=outline)
    else:
        draw.polygon([(x, y - 1.2 * r), (x - 1.1 * r, y + 0.8 * r), (x + 1.1 * r, y + 0.8 * r)],
                     fill=colour, outline=outline)


def embed_plot(features, out_path, size=800, method='pca', titles=None, max_classes=None, perplexity=30.0,
               centre=False):
    """Map of the clip-level audio (circles) and visual (triangles) embeddings coloured by class (the
    first label of each clip; grey for unlabelled clips), with a legend. features: one dict (one
    panel) or a list of dicts of the same clips (panels side by side, e.g. two checkpoints; titles
    name them). method: 'pca' or 'tsne' (embedding_coords; centre: t-SNE of centred modalities).
    max_classes: only the clips of the most frequent classes. Writes a PNG of
    (n * (size - legend) + legend, size): (size, size) for one panel."""
    features = [features] if isinstance(features, dict) else list(features)
    cls_all = clip_classes(features[0])
    keep = top_classes(cls_all, max_classes) if max_classes else list(range(len(cls_all)))
    if not keep:
        raise ValueError('no clip to draw: no clip has a label among the selected classes')
    cls = [cls_all[i] for i in keep]
    names = features[0].get('class_names') or []
    n, N = len(features), len(keep)
    legend_w, m = size * 2 // 7, size // 20
    panel_w = size - legend_w
    canvas = Image.new('RGB', (n * panel_w + legend_w, size), 'white')
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    r = max(2, size // 160)
    for p, feats in enumerate(features):
        xy, (xlabel, ylabel), title = embedding_coords(feats, method, keep, perplexity, centre=centre)
        x0 = p * panel_w
        box = (x0 + m, m, x0 + panel_w - m // 2, size - m)  # plot area (left, top, right, bottom)
        draw.rectangle(box, outline=(160, 160, 160))
        if titles:
            title = f'{titles[p]}: {title}'
        draw.text((x0 + m, m // 4), title, fill='black', font=font)
        draw.text((x0 + m, size - m + 4), xlabel, fill='black', font=font)
        draw.text((x0 + 2, m - 14), ylabel, fill='black', font=font)
        lo, hi = xy.min(dim=0).values, xy.max(dim=0).values
        span = (hi - lo).clamp(min=1e-12)
        inner = 0.92  # keep markers off the frame
        scale = inner * min((box[2] - box[0]) / span[0].item(), (box[3] - box[1]) / span[1].item())  # equal aspect
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        mid = (lo + hi) / 2
        order = torch.randperm(2 * N, generator=torch.Generator().manual_seed(0)).tolist()  # no class drawn last on top
        for i in order:
            px = cx + scale * (xy[i, 0] - mid[0]).item()
            py = cy - scale * (xy[i, 1] - mid[1]).item()
            c = cls[i % N]
            _marker(draw, px, py, r, 'circle' if i < N else 'triangle', class_colour(c) if c >= 0 else (150, 150, 150))

    lx, ly, line = n * panel_w, m, 16
    for shape, text in (('circle', 'audio'), ('triangle', 'video')):
        _marker(draw, lx + r, ly + 6, r, shape, (90, 90, 90))
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
        label = name if len(name) <= max_chars else name[:max_chars - 3] + '...'
        draw.text((lx + 16, ly), label, fill='black', font=font)
        ly += line
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return out_path


def nice_ticks(lo, hi, count=5):
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 5, 10) if s * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _lighter(colour, amount=0.75):
    return tuple(int(round(c + (255 - c) * amount)) for c in colour)


def line_panel(draw, box, series, title='', xlabel='', font=None, ylim=None):
    """Line chart in box (left, top, right, bottom) of an ImageDraw: series = list of dicts with x, y
    (lists), colour, and optional lo, hi (a band drawn lighter under the line, e.g. the spread over
    seeds). Axes with round ticks; ylim (lo, hi) fixes the y range."""
    font = font or ImageFont.load_default()
    left, top, right, bottom = box
    px0, py0, px1, py1 = left + 44, top + 18, right - 8, bottom - 30  # plot area inside the labels
    xs = [x for s in series for x in s['x']]
    ys = [y for s in series for y in list(s['y']) + list(s.get('lo') or []) + list(s.get('hi') or [])]
    draw.text((px0, top + 2), title, fill='black', font=font)
    if not xs:
        draw.text((px0, (py0 + py1) // 2), 'no data', fill='black', font=font)
        return
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = ylim if ylim else (min(ys), max(ys))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    if not ylim:
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x, y):
        return (px0 + (x - x_lo) / (x_hi - x_lo) * (px1 - px0), py1 - (y - y_lo) / (y_hi - y_lo) * (py1 - py0))

    draw.rectangle((px0, py0, px1, py1), outline=(160, 160, 160))
    for t in nice_ticks(y_lo, y_hi):
        _, y = to_px(x_lo, t)
        draw.line((px0 - 3, y, px0, y), fill='black')
        draw.line((px0 + 1, y, px1 - 1, y), fill=(235, 235, 235))
        draw.text((left + 2, y - 6), f'{t:g}', fill='black', font=font)
    for t in nice_ticks(x_lo, x_hi):
        x, _ = to_px(t, y_lo)
        draw.line((x, py1, x, py1 + 3), fill='black')
        draw.text((x - 8, py1 + 4), f'{t:g}', fill='black', font=font)
    draw.text(((px0 + px1) // 2 - 20, py1 + 16), xlabel, fill='black', font=font)
    for s in series:  # bands first, so that no line is hidden under another series' band
        if s.get('lo') is not None and len(s['x']) > 1:
            draw.polygon([to_px(x, y) for x, y in zip(s['x'], s['hi'])] +
                         [to_px(x, y) for x, y in zip(s['x'][::-1], s['lo'][::-1])], fill=_lighter(s['colour']))
    for s in series:
        points = [to_px(x, y) for x, y in zip(s['x'], s['y'])]
        if len(points) > 1:
            draw.line(points, fill=s['colour'], width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=s['colour'])


def legend_row(draw, xy, entries, font=None):
    """Coloured swatches with labels in one row from xy: entries = [(label, colour)]."""
    font = font or ImageFont.load_default()
    x, y = xy
    for label, colour in entries:
        draw.rectangle((x, y + 2, x + 18, y + 10), fill=colour)
        draw.text((x + 22, y), label, fill='black', font=font)
        x += 22 + int(draw.textlength(label, font=font)) + 16


def read_log(path):
    """train.py's log.jsonl -> (training records {iter: record}, retrieval {iter: results}); a
    resumed run repeats iterations: the last record of an iteration wins."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such log (train.py writes out_dir/log.jsonl)')
    train, retrieval = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}, line {n}: not JSON ({e})') from None
            if 'retrieval' in record:
                retrieval[record['iter']] = record['retrieval']
            else:
                train[record['iter']] = record
    return dict(sorted(train.items())), dict(sorted(retrieval.items()))


DYNAMICS_KEYS = {'rec_a': 'reconstruction loss, audio', 'rec_v': 'reconstruction loss, visual',
                 'con': 'contrastive loss (InfoNCE)'}


def dynamics_plot(logs, out_path, labels=None, keys=('rec_a', 'rec_v', 'con'), width=1200, height=380):
    """Training dynamics of two or more runs side by side (TG-DP supplement, Fig. 1): one panel per
    loss term of train.py's log (logged every log_interval steps), one line per run. Writes a
    (width, height) PNG and returns {label: {key: (iters, values)}}."""
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in logs]
    if len(labels) != len(logs):
        raise ValueError(f'{len(logs)} logs but {len(labels)} labels')
    curves = {}
    for path, label in zip(logs, labels):
        train, _ = read_log(path)
        if not train:
            raise ValueError(f'{path} holds no training records')
        curves[label] = {}
        for key in keys:
            missing = [it for it, r in train.items() if key not in r]
            if missing:
                raise ValueError(f'{path}: iteration {missing[0]} has no {key!r} (keys: {sorted(train[missing[0]])})')
            curves[label][key] = (list(train), [train[it][key] for it in train])
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    colours = {label: class_colour(k) for k, label in enumerate(labels)}
    legend_row(draw, (10, 6), [(label, colours[label]) for label in labels], font)
    panel_w = width // len(keys)
    for j, key in enumerate(keys):
        series = [dict(x=curves[label][key][0], y=curves[label][key][1], colour=colours[label]) for label in labels]
        box = (j * panel_w, 24, (j + 1) * panel_w, height)
        line_panel(draw, box, series, DYNAMICS_KEYS.get(key, key), 'iteration', font)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return curves


def case_study(features, queries, k=5, strategy='diag_mean'):
    """Audio -> visual retrieval for the clips `queries` (list of indices), from the same scores as
    retrieval() (similarity(g_a, g_v)): (Q, k) candidate indices, best first, their scores, and the
    rank of each query's true match (ties count against the model, as in retrieval_metrics)."""
    sim = similarity(features['g_a'][queries], features['g_v'], strategy)  # (Q, N)
    scores, idx = sim.topk(min(k, sim.shape[1]), dim=1)
    true = sim[torch.arange(len(queries)), torch.as_tensor(queries)]  # (Q,)
    return idx, scores, (sim >= true[:, None]).sum(dim=1)


def cases_plot(dataset, features, out_path, queries, k=5, titles=None, frame=None, strategy='diag_mean', cell=96):
    """Retrieval case study (TG-DP supplement, Fig. 3): one row per audio query (its spectrogram
    segment of frame t, middle by default), then per checkpoint the middle frames of its top-k
    visual candidates, best first; the true match is outlined in green, and the rank of the true
    match is written after each group. features: a list of extract_features dicts of `dataset`
    (one per checkpoint). Returns {'topk': [(Q, k) per checkpoint], 'boxes': {(p, q, j): cell box}}."""
    features = [features] if isinstance(features, dict) else list(features)
    titles = titles or [f'checkpoint {p + 1}' for p in range(len(features))]
    T = features[0]['g_a'].shape[1]
    t = T // 2 if frame is None else frame
    if not 0 <= t < T:
        raise ValueError(f'--frame {t} is outside 0..{T - 1}')
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
        draw.text((x0, 2), f'{titles[p]}: top {k} frames (A->V, {strategy})', fill='black', font=font)
        for q in range(Q):
            y = 2 * label_h + q * (cell + label_h + 8)
            for j, c in enumerate(idx[q].tolist()):
                box = (x0 + j * (cell + 4), y, x0 + j * (cell + 4) + cell, y + cell)
                img = Image.fromarray(frame_to_rgb(item(c)['image'][t])).resize((cell, cell), Image.BICUBIC)
                canvas.paste(img, box[:2])
                hit = c == queries[q]
                draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 1, box[3] + 1),
                               outline=(0, 200, 0) if hit else (200, 200, 200), width=3 if hit else 1)
                draw.text((box[0], box[3] + 2), f'{j + 1}', fill='black', font=font)
                boxes[(p, q, j)] = box
            draw.text((x0 + k * (cell + 4) + 4, y + cell // 2 - 6), f'match: #{int(ranks[q])}', fill='black', font=font)
    for q, i in enumerate(queries):
        y = 2 * label_h + q * (cell + label_h + 8)
        spec = Image.fromarray(spectrogram_to_rgb(item(i)['audio'][t])).resize((spec_w, cell), Image.BICUBIC)
        canvas.paste(spec, (8, y))
        draw.text((8, y + cell + 2), str(item(i)['id'])[:24], fill='black', font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return dict(topk=topk, boxes=boxes)


# -----------------------------------------------------------------------------
# ablation: TG-DP Tables 5-8 and the CAV-MAE Sync baseline at laptop scale
#
# Every row trains config/demo.py's model with train.py (a subprocess per run, out of which only the
# settings below change) on one synthetic data set, for several seeds, and reports the held-out
# retrieval that train.py logs (diag_mean, 80 clips) at the last iteration. The data design and the
# training settings are fixed here, before any comparison, and are the same for every row.

ABLATION_DATA = dict(  # data.make_synthetic: the demo's clips plus the kinds of semantic noise TG-DP names
    num_clips=400, seed=0, num_classes=10, frame_size=96,
    on_slots=(5, 10),      # the demo's silent stretches: 5-13 of 16 slots hold the event
    offscreen=0.1,         # a tenth of the sound events have their object off screen
    silent_objects=0.25,   # a quarter of the clips show an object of another class that makes no sound
    clutter=2,             # two static desaturated shapes in every background
    hum=0.02)              # a steady off-screen tone at a random pitch under every clip
# Chosen before any comparison, from two TG-DP runs only (seed 0, 400 iterations): with on_slots=(4, 8),
# offscreen=0.2, silent_objects=0.5, clutter=3, hum=0.03 held-out R@1 stayed at chance (1.2% / 2.5%);
# with the design above it reached 8.8% V->A / 10.0% A->V (chance 1.25%).
ABLATION_SETTINGS = {  # train.py settings on top of config/demo.py (and the row's), seeds 0..seeds-1
    'full': dict(seeds=3, max_iters=400, eval_interval=50),
    'quick': dict(seeds=1, max_iters=200, eval_interval=50),
}
ABLATION_RUNS = {  # run name -> the row's train.py settings
    'sync': dict(method='sync'),
    'dualpass_75': dict(method='dualpass', contrastive_mask_ratio=0.75),
    'tgdp': dict(method='tgdp'),  # guided view at contrastive ratio 0.5, with distillation: TG-DP itself
    'tgdp_ratio0': dict(method='tgdp', contrastive_mask_ratio=0.0),
    'tgdp_ratio0.2': dict(method='tgdp', contrastive_mask_ratio=0.2),
    'tgdp_ratio0.65': dict(method='tgdp', contrastive_mask_ratio=0.65),
    'tgdp_ratio0.75': dict(method='tgdp', contrastive_mask_ratio=0.75),
    'tgdp_nodis': dict(method='tgdp', dis_weight=0.0),
    'tgdp_random': dict(method='tgdp', contrastive_masking='random'),
    'tgdp_gumbel': dict(method='tgdp', contrastive_masking='gumbel'),
}
# (title, [(row label, run, paper)]): paper = the paper's (V->A R@1, R@5, R@10, A->V R@1, R@5, R@10)
# for that row of TG-DP Tables 5-8, None where not filled in.
ABLATION_TABLES = [
    ('Table 5: single vs dual pass', [
        ('CAV-MAE Sync (one pass, 75%)', 'sync', None),
        ('dual pass, both random 75%', 'dualpass_75', None),
        ('TG-DP', 'tgdp', None)]),
    ('Table 6: contrastive mask ratio', [
        ('0', 'tgdp_ratio0', None), ('0.2', 'tgdp_ratio0.2', None), ('0.5 (TG-DP)', 'tgdp', None),
        ('0.65', 'tgdp_ratio0.65', None), ('0.75', 'tgdp_ratio0.75', None)]),
    ('Table 7: distillation', [
        ('without', 'tgdp_nodis', None), ('with (TG-DP)', 'tgdp', None)]),
    ('Table 8: contrastive view', [
        ('random', 'tgdp_random', None), ('guided top-k (TG-DP)', 'tgdp', None),
        ('Gumbel top-k', 'tgdp_gumbel', None)]),
]
RECALLS = [(d, k) for d in ('V->A', 'A->V') for k in ('R@1', 'R@5', 'R@10')]


def ablation_data(data_dir, design):
    """Writes the ablation's synthetic clips into data_dir, or checks that the clips there were made
    with `design`."""
    config_path = os.path.join(data_dir, 'synth_config.json')
    expected = json.loads(json.dumps(design))  # tuples as JSON lists, as synth_config.json holds them
    if os.path.isfile(config_path):
        with open(config_path) as f:
            found = json.load(f)
        found = {k: found.get(k) for k in expected}
        if found != expected:
            raise ValueError(f'{data_dir} holds synthetic clips of another design {found}; the ablation needs '
                             f'{expected}: remove the folder or pass another --data')
        return
    data.make_synthetic(data_dir, **design)


def train_run(run_dir, settings, data_dir, train_args=()):
    """One train.py run (config/demo.py + settings) in run_dir, resumed from its checkpoint if a
    previous attempt stopped; its output goes to run_dir/train.log. Returns the log's records."""
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.isfile(os.path.join(run_dir, 'ckpt.pt'))
    if not resume and os.path.isfile(os.path.join(run_dir, 'log.jsonl')):
        os.remove(os.path.join(run_dir, 'log.jsonl'))  # a start from scratch logs from iteration 1 again
    root = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(root, 'train.py'), os.path.join(root, 'config', 'demo.py'),
           f'--out_dir={run_dir}', f"--train_json={os.path.join(data_dir, 'train.json')}",
           f"--eval_json={os.path.join(data_dir, 'eval.json')}",
           *[f'--{k}={v}' for k, v in settings.items()], *train_args] + (['--init_from=resume'] if resume else [])
    with open(os.path.join(run_dir, 'train.log'), 'a') as log:
        log.write(' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(os.path.join(run_dir, 'train.log')) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f'train.py failed in {run_dir} (exit code {proc.returncode}):\n{tail}')
    return read_log(os.path.join(run_dir, 'log.jsonl'))


def ablation_run(out_dir, run, seed, settings, data_dir, design, train_args=()):
    """Result of one (row, seed): {'settings', 'final': {direction: metrics}, 'curve': [[iter, R@1 V->A,
    R@1 A->V]]}, from out_dir/runs/<run>/seed<seed>/result.json when a run with the same settings
    finished there before (resumable)."""
    run_dir = os.path.join(out_dir, 'runs', run, f'seed{seed}')
    record = dict(run=run, seed=seed, train=dict(settings, seed=seed), train_args=list(train_args),
                  data=json.loads(json.dumps(design)))  # as result.json holds it
    path = os.path.join(run_dir, 'result.json')
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if done['settings'] != record:
            raise ValueError(f'{path} was made with other settings ({done["settings"]} vs {record}); use another --out')
        return done
    _, retrieval = train_run(run_dir, dict(settings, seed=seed), data_dir, train_args)
    last = settings['max_iters']
    if last not in retrieval:
        raise RuntimeError(f'{run_dir}/log.jsonl has no retrieval at iteration {last} (found {list(retrieval)})')
    result = dict(settings=record, final=retrieval[last],
                  curve=[[it, r['V->A']['R@1'], r['A->V']['R@1']] for it, r in retrieval.items()])
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(path + '.tmp', path)
    return result


def mean_std(values):
    """Mean and sample standard deviation (n - 1; None for one value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summarize_runs(results):
    """{run: [result per seed]} -> {run: {'seeds', 'mean': {direction: {R@k}}, 'std': ..., 'curve': ...}}
    curve: iterations and, per direction, the mean / min / max R@1 over seeds at each."""
    summary = {}
    for run, per_seed in results.items():
        s = dict(seeds=[r['settings']['seed'] for r in per_seed], mean={'V->A': {}, 'A->V': {}},
                 std={'V->A': {}, 'A->V': {}}, final={str(r['settings']['seed']): r['final'] for r in per_seed})
        for d, k in RECALLS:
            s['mean'][d][k], s['std'][d][k] = mean_std([r['final'][d][k] for r in per_seed])
        iters = sorted(set.intersection(*[set(it for it, _, _ in r['curve']) for r in per_seed]))
        curve = dict(iters=iters)
        for col, d in ((1, 'V->A'), (2, 'A->V')):
            at = [[dict((row[0], row[col]) for row in r['curve'])[it] for r in per_seed] for it in iters]
            curve[d] = dict(mean=[sum(v) / len(v) for v in at], min=[min(v) for v in at], max=[max(v) for v in at])
        s['curve'] = curve
        summary[run] = s
    return summary


def ablation_table_rows(summary, tables=ABLATION_TABLES):
    """Printable rows: per table a title row, then per row label | 6 x 'mean ± std' | paper."""
    rows = []
    for title, entries in tables:
        rows.append([title] + [''] * 8)
        for label, run, paper in entries:
            if run not in summary:
                continue
            s = summary[run]
            cells = [f"{s['mean'][d][k]:.1f}" + (f" ± {s['std'][d][k]:.1f}" if s['std'][d][k] is not None else '')
                     for d, k in RECALLS]
            ref = ['/'.join(f'{x:.1f}' for x in paper[i:i + 3]) if paper else '-' for i in (0, 3)]
            rows.append(['  ' + label] + cells + ref)
    return rows


def paired_wins(summary, reference='tgdp'):
    """{run: {direction: {R@K: [seeds where run > reference, seeds both have]}}} for every run but the reference.
    A seed pairs two rows: train.py seeds the initial weights and the batch order with it, so the rows of one
    seed start from the same model and see the same batches; only the row's settings differ."""
    out = {}
    for run, s in summary.items():
        if run == reference or reference not in summary:
            continue
        ref = summary[reference]['final']
        seeds = [seed for seed in s['final'] if seed in ref]
        out[run] = {d: {k: [sum(s['final'][seed][d][k] > ref[seed][d][k] for seed in seeds), len(seeds)]
                        for _, k in RECALLS[:3]} for d in ('V->A', 'A->V')}
    return out


def paired_rows(paired, tables=ABLATION_TABLES):
    """Printable rows of paired_wins: label | 6 x 'better/seeds', in the tables' order, each run once."""
    labels = {}
    for title, entries in tables:
        for label, run, _ in entries:
            labels.setdefault(run, f"{title.split(':')[0]}: {label}")
    return [[labels.get(run, run)] + ['{}/{}'.format(*paired[run][d][k]) for d, k in RECALLS]
            for run in labels if run in paired]


ABLATION_HEADER = ['row', 'V->A R@1', 'R@5', 'R@10', 'A->V R@1', 'R@5', 'R@10',
                   'paper V->A 1/5/10', 'paper A->V 1/5/10']


def ablation_design_text(settings, design, train_args=()):
    """The lines stated next to the table: data design and training settings."""
    noise = ', '.join(f'{k}={tuple(v) if isinstance(v, list) else v}' for k, v in design.items()
                      if k not in ('num_clips', 'seed', 'num_classes', 'frame_size'))
    n = design['num_clips']
    return [f"data: {n} synthetic clips (data.py synth, seed {design['seed']}), {design['num_classes']} classes, "
            f"{n - n // 5} train / {n // 5} held out; semantic noise: {noise}",
            f"training: config/demo.py (1.25 M parameters, CPU, batch 32) for {settings['max_iters']} iterations, "
            f"the same for every row{', plus ' + ' '.join(train_args) if train_args else ''}; seeds "
            f"0..{settings['seeds'] - 1}; held-out retrieval (diag_mean) every {settings['eval_interval']} iterations",
            'cells: mean ± sample standard deviation over seeds (one seed: its value) of R@K (percent) at the '
            f'last iteration; chance R@1 = {100 / (n // 5):.2f}%']


def ablation_plot(summary, out_path, lines, tables=ABLATION_TABLES, width=1600):
    """PNG: the table (text), then the learning curves of held-out R@1 per table and direction: the mean
    over seeds as a line, min..max over seeds as a band."""
    font = ImageFont.load_default()
    rows = ablation_table_rows(summary, tables)
    line_h, panel_h = 15, 300
    table_h = (len(rows) + len(lines) + 4) * line_h
    canvas = Image.new('RGB', (width, table_h + 2 * panel_h), 'white')
    draw = ImageDraw.Draw(canvas)
    cells = [ABLATION_HEADER] + rows
    widths = [max(int(draw.textlength(str(r[i]), font=font)) for r in cells) + 14 for i in range(len(ABLATION_HEADER))]
    y = 6
    for j, row in enumerate(cells):
        x = 8
        for i, (cell, w) in enumerate(zip(row, widths)):
            tw = draw.textlength(str(cell), font=font)
            draw.text((x if i == 0 else x + w - 14 - tw, y), str(cell), fill='black', font=font)
            x += w
        if j == 0:
            draw.line((8, y + line_h - 1, x, y + line_h - 1), fill='black')
        y += line_h
    y += line_h // 2
    for text in lines:
        draw.text((8, y), text, fill='black', font=font)
        y += line_h
    panel_w = width // len(tables)
    colours = {run: class_colour(k) for k, run in enumerate(ABLATION_RUNS)}  # a run keeps its colour in every panel
    top = max([v for s in summary.values() for d in ('V->A', 'A->V') for v in s['curve'][d]['max']] + [1.0])
    ylim = (0.0, 10 * math.ceil(top / 10))  # one scale for every panel
    for p, (title, entries) in enumerate(tables):
        for q, d in enumerate(('V->A', 'A->V')):
            series = []
            for label, run, _ in entries:
                if run in summary:
                    c = summary[run]['curve']
                    series.append(dict(x=c['iters'], y=c[d]['mean'], lo=c[d]['min'], hi=c[d]['max'],
                                       colour=colours[run], label=label))
            box = (p * panel_w, table_h + q * panel_h, (p + 1) * panel_w, table_h + (q + 1) * panel_h - 24)
            line_panel(draw, box, series, f'{title.split(":")[0]}, held-out R@1 {d} (%)', 'iteration', font, ylim)
            legend_row(draw, (box[0] + 8, box[3] + 4), [(s['label'], s['colour']) for s in series], font)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return out_path


def ablate(out_dir, mode='full', runs=None, seeds=None, max_iters=None, eval_interval=None, data_dir=None,
           design=ABLATION_DATA, train_args=(), tables=ABLATION_TABLES):
    """Trains every (row, seed) of the ablation not done yet in out_dir, then prints the table,
    writes out_dir/ablation.json and out_dir/ablation.png. seeds / max_iters / eval_interval override
    ABLATION_SETTINGS[mode] (then the table states the changed settings). Returns the JSON dict."""
    settings = dict(ABLATION_SETTINGS[mode])
    for key, value in (('seeds', seeds), ('max_iters', max_iters), ('eval_interval', eval_interval)):
        if value is not None:
            settings[key] = value
    runs = list(runs or ABLATION_RUNS)
    unknown = [r for r in runs if r not in ABLATION_RUNS]
    if unknown:
        raise ValueError(f'unknown ablation runs {unknown}; known: {list(ABLATION_RUNS)}')
    data_dir = data_dir or os.path.join(out_dir, 'data')
    ablation_data(data_dir, design)
    jobs = [(run, seed) for seed in range(settings['seeds']) for run in runs]  # every row's seed 0 first
    results = {run: [] for run in runs}
    t0 = time.time()
    bar = tqdm(jobs, desc='ablation runs', unit='run')
    for run, seed in bar:
        bar.set_postfix_str(f'{run} seed {seed}')
        train_settings = dict(ABLATION_RUNS[run], max_iters=settings['max_iters'],
                              eval_interval=settings['eval_interval'])
        r = ablation_run(out_dir, run, seed, train_settings, data_dir, design, train_args)
        results[run].append(r)
        bar.write(f"{run} seed {seed}: R@1 V->A {r['final']['V->A']['R@1']:.1f} A->V {r['final']['A->V']['R@1']:.1f}")
    summary = summarize_runs(results)
    lines = ablation_design_text(settings, design, train_args)
    print(f'\nablation ({mode}, {len(jobs)} runs, {time.time() - t0:.0f} s)')
    print_table(ABLATION_HEADER, ablation_table_rows(summary, tables))
    print('\n'.join(lines))
    paired = paired_wins(summary)
    if paired:
        print('\nseeds on which the row beats TG-DP (strictly higher R@K; a seed pairs the rows: same initial '
              'weights, same batches)')
        print_table(['row'] + ABLATION_HEADER[1:7], paired_rows(paired, tables))
    out = dict(mode=mode, settings=settings, data=design, train_args=list(train_args), notes=lines, runs=summary,
               paired=paired,
               tables=[dict(title=title, rows=[dict(label=label, run=run, paper=paper)
                                               for label, run, paper in entries]) for title, entries in tables])
    json_path = os.path.join(out_dir, 'ablation.json')
    with open(json_path, 'w') as f:
        json.dump(out, f, indent=1)
    png = ablation_plot(summary, os.path.join(out_dir, 'ablation.png'), lines, tables)
    print(f'wrote {json_path} and {png}')
    return out


# -----------------------------------------------------------------------------
# command line

def cmd_retrieval(args):
    feats = features_for(args.ckpt, args.data, args.label_csv, args.weights, 'joint',
                         args.num_frames, args.cache, None, args.dtype, args.batch_size,
                         args.device, args.num_workers)
    N, T, D = feats['g_a'].shape
    t0 = time.time()
    results = retrieval(feats, args.strategy, args.device)
    print(f'\nzero-shot retrieval, {N} clips x {T} frames, scored in {time.time() - t0:.2f} s')
    rows = [[s, d, m['R@1'], m['R@5'], m['R@10'], m['MedR']]
            for s, r in results.items() for d, m in r.items()]
    print_table(['strategy', 'direction', 'R@1', 'R@5', 'R@10', 'MedR'], rows, left=2)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(ckpt=args.ckpt, weights=args.weights, data=args.data, num_clips=N,
                           num_frames=T, dtype=args.dtype, results=results), f, indent=2)
        print(f'wrote {args.out}')


def probe_settings(label_csv, label_type, balanced, train_labels, eval_labels):
    """(multilabel, balanced) from --label_type and --balanced; 'auto': the task from the label CSV,
    class-balanced sampling for single-label sets only (the supplements: VGGSound yes, AS-20K
    no)."""
    task = label_type_from_csv(label_csv) if label_type == 'auto' else label_type
    if task == 'single':
        for name, labels in (('--train', train_labels), ('--eval', eval_labels)):
            several = int((labels.sum(1) > 1).sum())
            if several:
                raise ValueError(f'{name}: {several} clips have several labels, but the probe '
                                 f'is single-label (--label_type {label_type}, label CSV '
                                 f'{label_csv}); use --label_type multi')
    return task == 'multi', task == 'single' if balanced == 'auto' else balanced == 'yes'


def probe_report(out, eval_scores, eval_labels):
    """Prints the per-epoch table and the final metric; for mAP also the classes without a positive
    in the eval set (AP 0, as in CAV-MAE's stats.py) and the mAP over the others, returned too."""
    metric = out['metric']
    print()
    print_table(['epoch', 'lr', 'train loss', metric],
                [[h['epoch'], f"{h['lr']:.2e}", f"{h['loss']:.4f}", h[metric]]
                 for h in out['history']], left=0)
    print(f"\n{metric}: {out['final']:.1f} with weights averaged over epochs "
          f"{out['wa_epochs'][0]}-{out['wa_epochs'][1]} ({out['last']:.1f} with the last weights)")
    if not out['multilabel']:
        return {}
    present = (eval_labels > 0).any(dim=0)  # (C,)
    aps = average_precisions(eval_scores.sigmoid(), eval_labels)  # (C,)
    report = dict(classes=len(present), classes_without_positive=int((~present).sum()),
                  mAP_present=100.0 * aps[present].mean().item())
    print(f"mAP over all {report['classes']} classes (CAV-MAE's stats.py); "
          f"{report['classes_without_positive']} have no positive in --eval and count as AP 0; "
          f"over the {int(present.sum())} with positives: {report['mAP_present']:.1f}")
    return report


def probe_training_split(args, get_model, extract):
    """-> (x_train or None, train labels (N, C), epoch_inputs or None): --augment cached reads the
    cached features of --train; input extracts no plain pass (every epoch extracts its own)."""
    if args.augment == 'cached':
        train = features_for(args.ckpt, args.train, args.label_csv, args.weights, args.probe_input,
                             args.num_frames, args.cache, get_model, **extract)
        return probe_inputs(train, args.modality), train['labels'], None
    model = get_model()
    dataset = make_dataset(args.train, args.label_csv, model.config, args.num_frames)
    labels = torch.stack([data.multi_hot(c['classes'], dataset.num_classes) for c in dataset.clips])
    epoch_inputs = augmented_inputs(model, dataset, args.modality, args.probe_input, args.seed,
                                    args.mixup, **extract)
    return None, labels, epoch_inputs


def cmd_probe(args):
    get_model = functools.cache(lambda: load_model(args.ckpt, args.device, args.weights))
    extract = dict(dtype=args.dtype, batch_size=args.batch_size, device=args.device,
                   num_workers=args.num_workers)
    test = features_for(args.ckpt, args.eval, args.label_csv, args.weights, args.probe_input,
                        args.num_frames, args.cache, get_model, **extract)
    x_train, train_labels, epoch_inputs = probe_training_split(args, get_model, extract)
    if train_labels.shape[1] == 0 or train_labels.shape[1] != test['labels'].shape[1]:
        raise ValueError(f'--train and --eval need labels from the same --label_csv '
                         f'{args.label_csv}')
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
    report = probe_report(out, _probe_scores(out['probe'], x_eval, args.device), test['labels'])
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(ckpt=args.ckpt, weights=args.weights, train=args.train, eval=args.eval,
                           probe_input=args.probe_input, modality=args.modality, lr=lr,
                           epochs=epochs, metric=out['metric'], balanced=balanced,
                           augment=args.augment, dtype=args.dtype, final=out['final'],
                           last=out['last'], history=out['history'], **report), f, indent=2)
        print(f'wrote {args.out}')


def cmd_views(args):
    if args.weights != 'teacher':
        print('views: the priorities come from --weights model (train.py guides with --weights teacher)')
    model = load_model(args.ckpt, args.device, args.weights)
    dataset = make_dataset(args.data, None, model.config, args.num_frames, masks=True)
    scores = view_scores(model, dataset, args.mask_ratio, args.batch_size, args.device, args.num_workers,
                         args.num_clips, args.seed)
    n = min(args.num_clips or len(dataset), len(dataset))
    print(f'\ncontrastive views at mask ratio {args.mask_ratio} from the teacher priorities of {n} clips x '
          f'{args.num_frames} frames (percent; a uniformly random view keeps {100 * (1 - args.mask_ratio):.0f}% '
          'of any priority or object)')
    print_table(['view', 'audio priority kept', 'audio overlap', 'visual priority kept', 'visual overlap',
                 'object pixels kept'],
                [[m, s['a']['priority'], s['a']['overlap'], s['v']['priority'], s['v']['overlap'],
                  s['v'].get('object', '-')] for m, s in scores.items()])
    print('overlap: mean Jaccard of the kept patch sets of two frames of different clips')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(ckpt=args.ckpt, weights=args.weights, data=args.data, mask_ratio=args.mask_ratio,
                           views=scores), f, indent=1)
        print(f'wrote {args.out}')


def cmd_localize(args):
    model = load_model(args.ckpt, args.device, args.weights)
    dataset = make_dataset(args.data, None, model.config, args.num_frames, masks=True)
    paths = localize(model, dataset, args.out, args.frame, args.num_clips, args.batch_size, args.device,
                     args.num_workers)
    print(f'wrote {len(paths)} heat maps to {args.out}')
    if not any(os.path.isfile(data.mask_path(clip['video_path'], i, clip['id']))
               for clip in dataset.clips for i in range(args.num_frames)):
        print('no object masks ({video_path}/mask_{i}/{video_id}.png): no localisation metrics')
        return
    scores = localization_scores(model, dataset, args.batch_size, args.device, args.num_workers, args.metrics_clips,
                                 args.top)
    m = scores['model']
    print(f"\nsound-source localisation, {m['frames']} frames with a non-empty mask "
          f"(skipped: {scores['skipped']['no mask file']} without a mask file, "
          f"{scores['skipped']['empty mask']} empty)")
    if args.top != 0.5:
        print(f'cIoU with the top {args.top:.0%} of each map predicted (the benchmarks use 50%)')
    print_table(['map', 'cIoU@0.5', 'AUC', 'mean cIoU', 'pointing'],
                [[name, s['cIoU@0.5'], s['AUC'], s['mean cIoU'], s['pointing']]
                 for name, s in scores.items() if name in ('model', 'centre prior')])
    path = os.path.join(args.out, 'metrics.json')
    with open(path, 'w') as f:
        json.dump(dict(ckpt=args.ckpt, weights=args.weights, data=args.data, top=args.top, **scores), f, indent=1)
    print(f'wrote {path}')


def cmd_reconstruct(args):
    model = load_model(args.ckpt, args.device, args.weights)
    dataset = make_dataset(args.data, None, model.config, args.num_frames)
    out = args.out if args.out.endswith('.png') else os.path.join(args.out, 'reconstruction.png')
    reconstruct(model, dataset, out, args.frame, args.num_clips, args.mask_ratio, args.device, args.seed)
    print(f'wrote {out}')


def second_checkpoint(args):
    """args for the --compare checkpoint: the same settings, its own features (and model)."""
    return argparse.Namespace(**{**vars(args), 'ckpt': args.compare, 'model': None})


def checkpoint_titles(args):
    if args.titles:
        if len(args.titles) != 1 + bool(args.compare):
            raise ValueError(f'--titles needs {1 + bool(args.compare)} names, got {len(args.titles)}')
        return args.titles
    paths = [args.ckpt] + ([args.compare] if args.compare else [])
    return [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]


def cmd_embed(args):
    feats = [features_for(args, args.data, args.label_csv)]
    if args.compare:
        feats.append(features_for(second_checkpoint(args), args.data, args.label_csv))
    embed_plot(feats, args.out, args.size, args.method, checkpoint_titles(args), args.max_classes, args.perplexity,
               args.centre)
    print(f'wrote {args.out}')


def cmd_dynamics(args):
    curves = dynamics_plot(args.logs, args.out, args.labels, args.keys, args.width, args.height)
    for label, c in curves.items():
        print(f"{label}: {len(c[args.keys[0]][0])} logged steps, last " +
              ', '.join(f'{k} {v[1][-1]:.4f}' for k, v in c.items()))
    print(f'wrote {args.out}')


def cmd_cases(args):
    feats = [features_for(args, args.data)]
    if args.compare:
        feats.append(features_for(second_checkpoint(args), args.data))
    N = feats[0]['g_a'].shape[0]
    if any(f['ids'] != feats[0]['ids'] for f in feats):
        raise ValueError('the two checkpoints were evaluated on different clips')
    if args.queries:
        queries = args.queries
        bad = [q for q in queries if not 0 <= q < N]
        if bad:
            raise ValueError(f'--queries {bad} outside 0..{N - 1}')
    else:  # a reproducible random pick
        order = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed))
        queries = sorted(order[:args.num_queries].tolist())
    dataset = make_dataset(args.data, None, ModelConfig(**feats[0]['model_args']), args.num_frames)
    out = cases_plot(dataset, feats, args.out, queries, args.k, checkpoint_titles(args), args.frame, args.strategy)
    for p, title in enumerate(checkpoint_titles(args)):
        ids = feats[0]['ids']
        print(f'{title}: ' + '  '.join(f"{ids[q]} -> {[ids[c] for c in out['topk'][p][i].tolist()]}"
                                       for i, q in enumerate(queries)))
    print(f'wrote {args.out}')


def cmd_ablate(args):
    out = args.out or os.path.join('out', 'ablate_quick' if args.quick else 'ablate')
    ablate(out, 'quick' if args.quick else 'full', args.runs, args.seeds, args.max_iters, args.eval_interval, args.data)


def add_probe_parser(sub, common):
    """The probe sub-command and its settings (defaults: the papers' protocol)."""
    p = sub.add_parser('probe', parents=[common], help='attention probe on frozen features')
    p.add_argument('--train', required=True, help='training dataset JSON or shard set')
    p.add_argument('--eval', required=True, help='evaluation dataset JSON or shard set')
    p.add_argument('--label_csv', required=True)
    p.add_argument('--probe_input', choices=PROBE_INPUTS, default='global',
                   help="global: the modality encoders' global-token outputs (the releases'); "
                        'patch / register: their mean patch / register outputs; joint: g_a, g_v '
                        'after the joint layer and norm_a / norm_v (the retrieval embedding)')
    p.add_argument('--modality', choices=('av', 'a', 'v'), default='av')
    p.add_argument('--augment', choices=('input', 'cached'), default='input',
                   help="input: the papers' recipe, time shift and mixup of waveforms, frames and "
                        'labels, features re-extracted every epoch; cached: the quick option, '
                        'mixup of the cached features')
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
    p.add_argument('--out', help='results JSON')
    p.set_defaults(run=cmd_probe)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p = sub.add_parser('retrieval', parents=[common], help='zero-shot V->A and A->V retrieval')
    p.add_argument('--data', required=True, help='dataset JSON or shard set')
    p.add_argument('--label_csv', help='only stored with the features')
    p.add_argument('--strategy', nargs='+', choices=STRATEGIES, default=['diag_mean'])
    p.add_argument('--out', help='results JSON')
    p.set_defaults(run=cmd_retrieval)
    add_probe_parser(sub, common)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = 'bfloat16' if torch.device(args.device).type == 'cuda' else 'float32'
    args.run(args)


if __name__ == '__main__':
    main()
