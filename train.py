"""
TG-DP pretraining (SPEC sections 5-6), and the CAV-MAE Sync / dual-pass / CAV-MAE baselines.

A debug run on one CPU or GPU:
$ python data.py synth --out data_synth && python train.py config/demo.py
One node with 8 GPUs:
$ torchrun --standalone --nproc_per_node=8 train.py config/tgdp_as2m.py
Several nodes (run on each; rank 0's address as master):
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py config/tgdp_as2m.py
Settings are the globals below, overridden by config files and --key=value, in that order.
"""
import ast
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import masking
from losses import distill_loss, info_nce
from model import CAVMAESync, ModelConfig, ema_update, forward_flops, load_weights, make_teacher

# -----------------------------------------------------------------------------
# default config: the TG-DP paper setting
# I/O
out_dir = 'out'
train_json = ''                # CAV-MAE layout JSON (data.py prepare / data.py synth)
eval_json = ''                 # held-out clips for the periodic retrieval evaluation ('' = none)
label_csv = ''                 # optional: labels are not needed for pretraining
eval_interval = 2000           # iterations between retrieval evaluation + checkpoint
log_interval = 20
init_from = 'scratch'          # 'scratch', 'resume' (out_dir/ckpt.pt) or a path: ImageNet MAE / official / train.py weights
# data
batch_size = 64                # clips per rank per micro-step
gradient_accumulation_steps = 1
num_workers = 8
num_frames = 16
time_shift = True              # random time shift of the waveform (pretraining augmentation)
# model (ModelConfig; the global token is on except for method='cavmae')
audio_length = 416
num_mel_bins = 128
img_size = 224
patch_size = 16
embed_dim = 768
num_heads = 12
mlp_ratio = 4.0
modality_depth = 11
joint_depth = 1
decoder_embed_dim = 512
decoder_depth = 8
decoder_num_heads = 16
num_registers = 8
norm_pix_loss = False
diffused_mask_tokens = False   # DiffMAViL: noised masked patches instead of the learned mask token
decoder_attention = 'self'     # 'self' | 'cross' (DiffMAViL: masked queries attend only to visible latents)
# method
method = 'tgdp'                # 'tgdp' | 'sync' (CAV-MAE Sync) | 'dualpass' (two random passes, no teacher) | 'cavmae'
mask_ratio = 0.75              # reconstruction pass (and the single pass of sync / cavmae)
mask_ratio_schedule = 'none'   # DiffMAViL curriculum: 'none' | 'epoch' | 'step', linear from mask_ratio to mask_ratio_end
mask_ratio_end = 0.8
adaptive_batch = False         # DiffMAViL: per-epoch batch (1 - min ratio) / (1 - ratio_e) * batch_size (needs 'epoch')
contrastive_mask_ratio = 0.5   # contrastive pass of tgdp / dualpass
contrastive_masking = 'guided' # tgdp: 'guided' | 'random' | 'gumbel' (the release's) | 'gumbel_proportional'
contrastive_direction = 'both' # InfoNCE: 'both' (TG-DP release) | 'v2a' (visual queries: CAV-MAE Sync) | 'a2v'
contrastive_negatives = 'global'  # 'global' (every rank's batch: TG-DP release) | 'local' (this rank's: CAV-MAE Sync)
rec_weight = 1.0
con_weight = 0.1
dis_weight = 1.0               # tgdp distillation; 0 turns it off
temperature = 0.05
ema_momentum = 0.996           # teacher EMA momentum, cosine ramp to ema_momentum_end
ema_momentum_end = 1.0
# optimiser
learning_rate = 2e-4
min_lr = 0.0
weight_decay = 5e-7
beta1 = 0.95
beta2 = 0.999
grad_clip = 0.0                # 0 = off
epochs = 35.0
warmup_epochs = 3.5
max_iters = 0                  # 0 = derived from epochs
# system
device = 'cuda'
dtype = 'bfloat16'             # 'float32' | 'bfloat16' | 'float16' (autocast)
compile = True
compile_mode = 'default'       # torch.compile mode: 'default' | 'max-autotune' (autotuned kernels, CUDA graphs)
backend = 'nccl'               # 'nccl' on GPU, 'gloo' on CPU
seed = 1337
peak_tflops = 989.0            # per device, for MFU (H100 SXM dense bf16)
bench = False                  # time steps on random tensors, no data (config/bench.py)
bench_iters = 20
bench_warmup = 5
profile = False                # bench: torch.profiler over the timed steps, table in out_dir/profile.txt
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]


def apply_overrides(argv):
    """Config files (python, executed) then --key=value; unknown keys and wrong types are errors."""
    for arg in argv:
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                sys.exit(f'error: {arg!r} must be --key=value')
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare string
            updates, source = {key: value}, arg
        else:
            if not os.path.isfile(arg):
                sys.exit(f'error: config file {arg!r} not found')
            updates, source = {}, arg
            exec(open(arg).read(), {}, updates)
            updates = {k: v for k, v in updates.items() if not k.startswith('_')}
        for key, value in updates.items():
            if key not in config_keys:
                sys.exit(f'error: unknown setting {key!r} (from {source})')
            default = globals()[key]
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            if type(value) is not type(default):
                sys.exit(f'error: setting {key} must be {type(default).__name__}, got {value!r} (from {source})')
            globals()[key] = value


apply_overrides(sys.argv[1:])
config = {k: globals()[k] for k in config_keys}
if method not in ('tgdp', 'sync', 'dualpass', 'cavmae'):
    sys.exit(f"error: method must be 'tgdp', 'sync', 'dualpass' or 'cavmae', got {method!r}")
if contrastive_masking not in masking.CONTRASTIVE_MASKINGS:
    sys.exit(f"error: contrastive_masking must be one of {masking.CONTRASTIVE_MASKINGS}, got {contrastive_masking!r}")
if contrastive_direction not in ('both', 'v2a', 'a2v') or contrastive_negatives not in ('global', 'local'):
    sys.exit(f"error: contrastive_direction must be 'both', 'v2a' or 'a2v' and contrastive_negatives 'global' or "
             f"'local', got {contrastive_direction!r}, {contrastive_negatives!r}")
if mask_ratio_schedule not in ('none', 'epoch', 'step'):
    sys.exit(f"error: mask_ratio_schedule must be 'none', 'epoch' or 'step', got {mask_ratio_schedule!r}")
if adaptive_batch and mask_ratio_schedule != 'epoch':
    sys.exit("error: adaptive_batch=True changes the batch once per epoch: it needs mask_ratio_schedule='epoch'")
if compile_mode not in ('default', 'max-autotune', 'max-autotune-no-cudagraphs', 'reduce-overhead'):
    sys.exit(f"error: compile_mode must be 'default', 'max-autotune', 'max-autotune-no-cudagraphs' or 'reduce-overhead', got {compile_mode!r}")
if dtype not in ('float32', 'bfloat16', 'float16'):
    sys.exit(f"error: dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")

# -----------------------------------------------------------------------------
# processes and devices
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    if backend == 'nccl' and not torch.cuda.is_available():
        sys.exit("error: backend='nccl' needs CUDA; on CPU run with --device=cpu --backend=gloo")
    dist.init_process_group(backend=backend)
    rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    sys.exit("error: device='cuda' but no GPU is visible; run with --device=cpu (and --dtype=float32 --compile=False for speed)")
torch.manual_seed(seed)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))
if master:
    os.makedirs(out_dir, exist_ok=True)
    print('config:\n' + '\n'.join(f'  {k:24s} = {v!r}' for k, v in config.items()))
    print(f'{world_size} process(es), device {device}')

# -----------------------------------------------------------------------------
# data
def epoch_mask_ratio(epoch):  # reconstruction mask ratio of an epoch under the 'epoch' curriculum
    return masking.mask_ratio_schedule(epoch / max(1, math.ceil(epochs) - 1), mask_ratio, mask_ratio_end)


def step_mask_ratio(it):  # reconstruction mask ratio of an iteration
    if mask_ratio_schedule == 'epoch':
        return epoch_mask_ratio(locate(it)[0])
    if mask_ratio_schedule == 'step':
        return masking.mask_ratio_schedule(it / max(1, max_iters - 1), mask_ratio, mask_ratio_end)
    return mask_ratio


def epoch_batch_size(epoch):  # clips per rank per micro-step in an epoch
    if not adaptive_batch:
        return batch_size
    return masking.adaptive_batch_size(batch_size, epoch_mask_ratio(epoch), mask_ratio, mask_ratio_end)


def epoch_iters(epoch):  # optimiser steps in an epoch
    return bench_warmup + bench_iters if bench else len(sampler) // (epoch_batch_size(epoch) * gradient_accumulation_steps)


def locate(it):  # iteration -> (epoch, steps of that epoch already done): epochs may differ in length
    epoch = 0
    while it >= epoch_iters(epoch):
        it -= epoch_iters(epoch)
        epoch += 1
    return epoch, it


def iters_for(num_epochs):  # optimiser steps in the first num_epochs (fractional) epochs
    whole = int(num_epochs)
    return sum(epoch_iters(e) for e in range(whole)) + round((num_epochs - whole) * epoch_iters(whole))


if bench:
    dataset = None
    max_iters = bench_warmup + bench_iters
else:
    from data import AVDataset, collate
    for key in ('train_json',) + (('eval_json',) if eval_json else ()):
        path = globals()[key]
        if not path or not os.path.isfile(path):
            sys.exit(f'error: {key}={path!r} is not a file. For a demo on built-in synthetic clips run\n'
                     f'  python data.py synth --out data_synth && python train.py config/demo.py\n'
                     f'for real videos see `python data.py prepare --help` and the README.')
    data_args = dict(audio_length=audio_length, num_mel_bins=num_mel_bins, img_size=img_size, num_frames=num_frames)
    dataset = AVDataset(train_json, label_csv or None, mode='train', time_shift=time_shift, seed=seed, **data_args)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if min(epoch_iters(e) for e in range(math.ceil(epochs) or 1)) == 0:
        sys.exit(f'error: {len(dataset)} clips are fewer than one step ({max(map(epoch_batch_size, range(math.ceil(epochs) or 1)))} '
                 f'x {gradient_accumulation_steps} x {world_size} ranks); lower batch_size')
    max_iters = max_iters or iters_for(epochs)
warmup_iters = iters_for(warmup_epochs)


def ignore_sigterm(_):  # workers: the main process handles pre-emption and shuts them down itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_batches(epoch, skip):
    """This rank's micro-batches of one epoch, after skipping the first `skip` (exact mid-epoch resume)."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    B = epoch_batch_size(epoch)  # a new loader every epoch: the batch may change (adaptive_batch)
    indices = list(sampler)[skip * B:]
    loader = DataLoader(dataset, batch_size=B, sampler=indices, num_workers=num_workers, drop_last=True,
                        pin_memory=device_type == 'cuda', collate_fn=collate, worker_init_fn=ignore_sigterm,
                        persistent_workers=False)
    for batch in loader:
        yield batch['audio'].to(device, non_blocking=True), batch['image'].to(device, non_blocking=True)


# -----------------------------------------------------------------------------
# model, teacher, optimiser
model_args = dict(audio_length=audio_length, num_mel_bins=num_mel_bins, img_size=img_size, patch_size=patch_size,
                  embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, modality_depth=modality_depth, joint_depth=joint_depth,
                  decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
                  num_registers=num_registers, global_token=method != 'cavmae', norm_pix_loss=norm_pix_loss,
                  diffused_mask_tokens=diffused_mask_tokens, decoder_attention=decoder_attention)
assert set(model_args) == {f.name for f in fields(ModelConfig)}
iter_num, ckpt = 0, None
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    if not os.path.isfile(ckpt_path):
        sys.exit(f"error: init_from='resume' but {ckpt_path} does not exist")
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    changed = {k: (v, model_args[k]) for k, v in ckpt['model_args'].items() if model_args[k] != v}
    if changed:
        sys.exit(f'error: the model settings differ from the checkpoint {ckpt_path}: {changed}')
    iter_num = ckpt['iter_num']
model = CAVMAESync(ModelConfig(**model_args))
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
elif init_from != 'scratch':
    if not os.path.isfile(init_from):
        sys.exit(f"error: init_from must be 'scratch', 'resume' or a checkpoint file; {init_from!r} is none of these")
    load_weights(model, init_from, verbose=master)  # ImageNet MAE, CAV-MAE layout, official release or train.py
model.to(device)
raw_model = model  # unwrapped: EMA source, checkpoints, evaluation
teacher = make_teacher(model) if method == 'tgdp' else None
if teacher is not None and ckpt is not None:
    teacher.load_state_dict(ckpt['teacher'])
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                             fused=True)  # one kernel per step, no full-size temporaries (CPU: 0.18 s vs 1.0 s at 190 M)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if ckpt is not None:
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
if master:
    n_params = sum(p.numel() for p in model.parameters())
    print(f'model: {n_params / 1e6:.2f} M trainable parameters; {epoch_iters(0)} iterations in the first epoch, {max_iters} in all')
teacher_forward = teacher.forward_teacher if teacher is not None else None
if compile:
    model = torch.compile(model, mode=compile_mode)
    if teacher is not None:
        teacher_forward = torch.compile(teacher.forward_teacher, mode=compile_mode)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def get_lr(it):  # linear warmup, then cosine decay to min_lr over the remaining iterations
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (learning_rate - min_lr)


def get_momentum(it):  # EMA momentum: cosine ramp from ema_momentum to ema_momentum_end
    return ema_momentum_end - (ema_momentum_end - ema_momentum) * 0.5 * (1.0 + math.cos(math.pi * it / max(1, max_iters)))


def train_flops_per_clip(rec_mask_ratio):
    """Analytic training FLOPs per clip: 3x forward for the student (forward + backward), 1x for the teacher."""
    c = raw_model.config
    if method in ('sync', 'cavmae'):
        return 3 * sum(forward_flops(c, rec_mask_ratio, 'sync').values())
    student = sum(forward_flops(c, rec_mask_ratio, 'reconstruction').values()) + sum(forward_flops(c, contrastive_mask_ratio, 'contrastive').values())
    return 3 * student + (sum(forward_flops(c, 0.0, 'teacher').values()) if method == 'tgdp' else 0)


# Every random choice of a step (masks, Gumbel noise) comes from one generator with the same state on all
# ranks: each draws the noise of the whole global batch and keeps its own rows. The rows follow
# DistributedSampler's interleaving (global row i * world_size + rank), so a run computes the same masks
# for the same clips whatever the number of ranks, and the state is one tensor to checkpoint.
noise_gen = torch.Generator(device=device).manual_seed(seed)


def noise(B, n):  # (B, n) uniform noise: this rank's rows of the global batch's
    return torch.rand(world_size * B, n, generator=noise_gen, device=device)[rank::world_size]


def losses_for(audio, image, rec_mask_ratio):
    """One micro-batch of the selected method -> (total loss, dict of detached terms)."""
    terms = {}
    keep_a = keep_v = None
    B, Na, Nv = audio.shape[0], raw_model.num_patches_a, raw_model.num_patches_v
    if method == 'tgdp':
        # the release's Gumbel reading ranks the raw attention; the other choices do not depend on its scale
        t_a, t_v, p_a, p_v = teacher_forward(audio, image, normalize=contrastive_masking != 'gumbel')
        keep_a = masking.contrastive_keep(contrastive_masking, p_a, contrastive_mask_ratio, noise(B, Na))
        keep_v = masking.contrastive_keep(contrastive_masking, p_v, contrastive_mask_ratio, noise(B, Nv))
    elif method == 'dualpass':
        keep_a = masking.random_masking(B, Na, contrastive_mask_ratio, noise=noise(B, Na))[0]
        keep_v = masking.random_masking(B, Nv, contrastive_mask_ratio, noise=noise(B, Nv))[0]
    out = model(audio, image, rec_mask_ratio, keep_a, keep_v, noise(B, Na), noise(B, Nv))
    loss_con, terms['con_acc'] = info_nce(out['g_a'], out['g_v'], temperature, contrastive_direction,
                                          contrastive_negatives)
    loss = rec_weight * out['loss'] + con_weight * loss_con
    terms.update(rec=out['loss'], rec_a=out['loss_a'], rec_v=out['loss_v'], con=loss_con)
    if method == 'tgdp' and dis_weight > 0:
        terms['dis'] = distill_loss(out['g_a'], out['g_v'], t_a, t_v)
        loss = loss + dis_weight * terms['dis']
    terms['loss'] = loss
    return loss, {k: v.detach() for k, v in terms.items()}


def train_step(micro_batches, rec_mask_ratio):
    """One optimiser step over gradient_accumulation_steps micro-batches. Returns (terms, stop flags):
    flags[0] = some rank saw a non-finite loss (the update is skipped), flags[1] = some rank got SIGTERM."""
    terms_sum = {}
    for micro_step in range(gradient_accumulation_steps):
        audio, image = next(micro_batches)
        sync_grads = not ddp or micro_step == gradient_accumulation_steps - 1  # all-reduce only on the last
        with (nullcontext() if sync_grads else model.no_sync()):
            with autocast:
                loss, terms = losses_for(audio, image, rec_mask_ratio)
            scaler.scale(loss / gradient_accumulation_steps).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v / gradient_accumulation_steps
    flags = torch.tensor([float(not torch.isfinite(terms_sum['loss'])), float(stop_requested)], device=device)
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] == 0:
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return terms_sum, flags


def save_checkpoint():
    """Rank 0 writes a temporary file and renames it."""
    if master:
        state = dict(model=raw_model.state_dict(), teacher=teacher.state_dict() if teacher is not None else None,
                     optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                     epoch=locate(iter_num)[0], model_args=model_args, config=config,
                     noise_gen=noise_gen.get_state())
        torch.save(state, ckpt_path + '.tmp')
        os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a crash never leaves a half-written ckpt.pt


def evaluate_retrieval():
    """Held-out clip retrieval (diagonal mean over frames) with the evaluate.py functions, rank 0 only."""
    from evaluate import extract_features, retrieval
    feats = extract_features(raw_model, eval_dataset, batch_size=max(1, batch_size // num_frames), device=device)
    return retrieval(feats, ('diag_mean',), device=device)['diag_mean']


def log(record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


# -----------------------------------------------------------------------------
# the loop
stop_requested = False


def on_sigterm(signum, frame):  # cluster pre-emption: finish the current step, save, exit
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, on_sigterm)
if ckpt is not None:
    noise_gen.set_state(ckpt['noise_gen'])
    del ckpt
eval_dataset = AVDataset(eval_json, label_csv or None, mode='eval', **data_args) if (eval_json and not bench) else None
model.train()


def bench_batches():
    audio = torch.randn(batch_size, audio_length, num_mel_bins, device=device)
    image = torch.randn(batch_size, 3, img_size, img_size, device=device)
    while True:
        yield audio, image


profiler = None
if bench and profile:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device_type == 'cuda' else [])

    def write_profile(prof):  # called when the active steps end (the profiler drops their events after that)
        table = prof.key_averages().table(sort_by=f'{"cuda" if device_type == "cuda" else "cpu"}_time_total', row_limit=30)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'profile.txt'), 'w') as f:
            f.write(table)
    profiler = torch.profiler.profile(activities=acts, on_trace_ready=write_profile,
                                      schedule=torch.profiler.schedule(wait=0, warmup=bench_warmup, active=bench_iters))
    profiler.start()


def sync_device():
    if device_type == 'cuda':
        torch.cuda.synchronize()


bar = tqdm(total=max_iters, initial=iter_num, disable=not master or bench, dynamic_ncols=True)
t_log, iters_since_log = time.time(), 0
while iter_num < max_iters:
    epoch, start = locate(iter_num)
    clips_per_iter = epoch_batch_size(epoch) * gradient_accumulation_steps * world_size
    micro_batches = bench_batches() if bench else epoch_batches(epoch, start * gradient_accumulation_steps)
    try:
        for _ in range(start, epoch_iters(epoch)):
            if bench and iter_num == bench_warmup:
                sync_device()
                t_bench = time.time()
            lr = get_lr(iter_num)
            for group in optimizer.param_groups:
                group['lr'] = lr
            rec_mask_ratio = step_mask_ratio(iter_num)
            terms, flags = train_step(micro_batches, rec_mask_ratio)
            if profiler is not None:
                profiler.step()
            if flags[0]:
                if master:
                    bar.close()
                    print(f'error: non-finite loss at iteration {iter_num} ({ {k: float(v) for k, v in terms.items()} }); '
                          f'stopping. The last good checkpoint {ckpt_path} is untouched.', file=sys.stderr)
                sys.exit(1)
            if teacher is not None:
                ema_update(teacher, raw_model, get_momentum(iter_num))
            iter_num += 1
            iters_since_log += 1
            bar.update(1)
            if not bench and (iter_num % log_interval == 0 or iter_num == max_iters):
                values = torch.stack(list(terms.values())).float()
                if ddp:  # every rank joins: the logged terms are means over the global batch
                    dist.all_reduce(values, op=dist.ReduceOp.AVG)
                if master:
                    clips_s = clips_per_iter * iters_since_log / (time.time() - t_log)
                    mfu = train_flops_per_clip(rec_mask_ratio) * clips_s / world_size / (peak_tflops * 1e12) if device_type == 'cuda' else None
                    record = {'iter': iter_num, 'epoch': epoch, 'lr': lr, 'mask_ratio': rec_mask_ratio,
                          'batch_size': clips_per_iter, 'clips_s': clips_s, 'mfu': mfu,
                              **dict(zip(terms, values.tolist()))}
                    log(record)
                    bar.write(f"iter {iter_num}: loss {record['loss']:.4f} rec {record['rec']:.4f} con {record['con']:.4f}"
                              + (f" dis {record['dis']:.4f}" if 'dis' in record else '')
                              + f" acc {record['con_acc']:.3f} lr {lr:.2e} {clips_s:.1f} clips/s"
                          + (f' mfu {100 * mfu:.1f}%' if mfu is not None else ''))
                t_log, iters_since_log = time.time(), 0
            if not bench and (iter_num % eval_interval == 0 or iter_num == max_iters or flags[1]):
                if master and eval_dataset is not None and not flags[1]:
                    results = evaluate_retrieval()
                    log({'iter': iter_num, 'retrieval': results})
                    bar.write(f'iter {iter_num}: retrieval R@1/5/10 ' + '  '.join(
                        f"{d} {r['R@1']:.1f}/{r['R@5']:.1f}/{r['R@10']:.1f}" for d, r in results.items()))
                save_checkpoint()
            if flags[1]:
                if master:
                    print(f'SIGTERM: saved {ckpt_path} at iteration {iter_num}; exiting', file=sys.stderr)
                sys.exit(0)
            if iter_num >= max_iters:
                break
    finally:  # shut the loader workers down now: they ignore SIGTERM, so exit-time cleanup would hang
        micro_batches.close()

bar.close()
if bench:
    sync_device()
    dt = time.time() - t_bench
    flops_per_clip = train_flops_per_clip(mask_ratio)
    clips_s = batch_size * gradient_accumulation_steps * bench_iters / dt
    tflops = flops_per_clip * clips_s / 1e12
    mem = f'{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB' if device_type == 'cuda' else 'n/a'
    mfu = f'{100 * tflops / peak_tflops:.1f}%' if device_type == 'cuda' else 'n/a'
    if profiler is not None:
        profiler.stop()
        print(f'profile of {bench_iters} steps (its overhead is in the timing above): {os.path.join(out_dir, "profile.txt")}')
    print(f'| method | batch | s/iter | clips/s | GFLOP/clip | TFLOP/s | MFU | peak mem |\n|---|---|---|---|---|---|---|---|\n'
          f'| {method} | {batch_size} | {dt / bench_iters:.3f} | {clips_s:.1f} | {flops_per_clip / 1e9:.4g} | {tflops:.3g} | {mfu} | {mem} |')
if ddp:
    dist.destroy_process_group()
