"""TG-DP pretraining (the TG-DP paper's method and recipe) and the CAV-MAE Sync / dual-pass /
CAV-MAE baselines. Settings: the globals below, overridden by config files, then --key=value.
$ python scripts/synth.py --out data_synth && python train.py config/demo.py  # debug, CPU or GPU
$ torchrun --standalone --nproc_per_node=8 train.py config/tgdp_as2m.py  # one node, 8 GPUs
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
    train.py config/tgdp_as2m.py  # several nodes: run on each, rank 0's address as master
"""
import ast
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import fields
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Subset
from tqdm import tqdm

import masking
from data import AVDataset, is_shard_set, train_batches
from evaluate import extract_features, retrieval
from losses import distill_loss, info_nce
from model import (CAVMAESync, ModelConfig, autocast, ema_update, forward_flops, load_weights,
                   make_teacher, read_checkpoint, warmup_cosine)

# -----------------------------------------------------------------------------
# default config: the TG-DP paper setting
# I/O
out_dir = 'out'
train_json = ''                # CAV-MAE layout JSON (scripts/prepare.py, synth.py) or a shard set
eval_json = ''                 # held-out clips (JSON or shard set), periodic retrieval ('' = none)
eval_interval = 2000           # iterations between retrieval evaluation + checkpoint
log_interval = 20
init_from = 'scratch'          # 'scratch' | 'resume' | weights file; out_dir's checkpoint resumes
# data
batch_size = 64                # clips per rank per micro-step
gradient_accumulation_steps = 1
num_workers = 8
shuffle_buffer = 1000          # shard sets: clips in each loader worker's shuffle buffer
skip_bad = False               # skip unreadable clips (a JSON's at start-up: out_dir/bad_clips.txt;
                               # mid-run: replaced in its batch, log: skipped_clips); False: error
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
decoder_attention = 'self'     # 'self' | 'cross' (DiffMAViL: masked queries see visible latents)
# method
method = 'tgdp'                # 'tgdp' | 'sync' (CAV-MAE Sync) | 'cavmae' | 'dualpass' (no teacher)
mask_ratio = 0.75              # reconstruction pass (and the single pass of sync / cavmae)
mask_ratio_schedule = 'none'   # DiffMAViL curriculum 'none' | 'epoch' | 'step' to mask_ratio_end
mask_ratio_end = 0.8
adaptive_batch = False         # DiffMAViL: epoch batch (1 - min ratio) / (1 - ratio_e) * batch_size
contrastive_mask_ratio = 0.5   # contrastive pass of tgdp / dualpass
contrastive_masking = 'guided' # 'guided' | 'random' | 'gumbel' (release) | 'gumbel_proportional'
contrastive_direction = 'both' # InfoNCE 'both' (TG-DP) | 'v2a' (CAV-MAE Sync: visual query) | 'a2v'
contrastive_negatives = 'global'  # 'global' (every rank's batch, TG-DP) | 'local' (CAV-MAE Sync)
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
compile_mode = 'default'       # torch.compile: 'default' | 'max-autotune' (tuned kernels, graphs)
backend = 'nccl'               # 'nccl' on GPU, 'gloo' on CPU
timeout_minutes = 60           # collectives wait this long (the periodic retrieval runs in between)
seed = 1337
peak_tflops = 989.0            # per device, for MFU (H100 SXM dense bf16)
bench = False                  # time steps on random tensors, no data (config/bench.py)
bench_iters = 20
bench_warmup = 5
profile = False                # bench: torch.profiler over the timed steps, out_dir/profile.txt
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]


def apply_overrides(argv):
    """Config files (python, executed) then --key=value; unknown keys and wrong types are errors."""
    for source in argv:
        if source.startswith('--'):
            key, sep, text = source[2:].partition('=')
            if not sep:
                sys.exit(f'error: {source!r} must be --key=value')
            try:
                updates = {key: ast.literal_eval(text)}
            except (SyntaxError, ValueError):
                updates = {key: text}  # a bare string
        elif os.path.isfile(source):
            updates = {}
            exec(open(source).read(), {}, updates)
            updates = {k: v for k, v in updates.items() if not k.startswith('_')}
        else:
            sys.exit(f'error: config file {source!r} not found')
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
allowed = dict(method=('tgdp', 'sync', 'dualpass', 'cavmae'), contrastive_masking=masking.CONTRASTIVE_MASKINGS,
               contrastive_direction=('both', 'v2a', 'a2v'), contrastive_negatives=('global', 'local'),
               mask_ratio_schedule=('none', 'epoch', 'step'), decoder_attention=('self', 'cross'),
               dtype=('float32', 'bfloat16', 'float16'),
               compile_mode=('default', 'max-autotune', 'max-autotune-no-cudagraphs', 'reduce-overhead'))
for key, values in allowed.items():
    if config[key] not in values:
        sys.exit(f"error: {key} must be one of {', '.join(map(repr, values))}; got {config[key]!r}")
if adaptive_batch and mask_ratio_schedule != 'epoch':
    sys.exit("error: adaptive_batch=True (a batch per epoch) needs mask_ratio_schedule='epoch'")
if mask_ratio_schedule != 'none' and mask_ratio_end > mask_ratio:
    sys.exit(f'error: mask_ratio_schedule={mask_ratio_schedule!r} would raise the mask ratio from '
             f'{mask_ratio} to {mask_ratio_end}; the DiffMAViL curriculum lowers it '
             f'(--mask_ratio=0.9 --mask_ratio_end=0.8)')

# -----------------------------------------------------------------------------
# processes and devices
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    if backend == 'nccl' and not torch.cuda.is_available():
        sys.exit("error: backend='nccl' needs CUDA; on CPU run with --device=cpu --backend=gloo")
    timeout = timedelta(minutes=timeout_minutes)
    # torchrun --max-restarts: in its shared agent store a restarted rank can read the keys of the
    # attempt before, a dead peer's address (torch 2.11: gloo's connect fails); each attempt's keys
    # get a prefix. Several nodes (restart counts differ): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
    attempt_store = {}
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        agent, rank, world_size = next(dist.rendezvous('env://', timeout=timeout))
        prefix = f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        attempt_store = dict(store=dist.PrefixStore(prefix, agent), rank=rank, world_size=world_size)
    dist.init_process_group(backend=backend, timeout=timeout, **attempt_store)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ['LOCAL_RANK'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    # evaluation features are gathered as Python objects on the CPU: a gloo group beside NCCL
    cpu_group = dist.new_group(backend='gloo', timeout=timeout) if backend == 'nccl' else None
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda' and not torch.cuda.is_available():
    sys.exit("error: device='cuda' but no GPU is visible; "
             "run with --device=cpu (and --dtype=float32 --compile=False for speed)")
torch.manual_seed(seed)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
mixed_precision = autocast(device, dtype)  # entered around every micro-step's forward
if master:
    os.makedirs(out_dir, exist_ok=True)
    print('config:\n' + '\n'.join(f'  {k:24s} = {v!r}' for k, v in config.items()))
    print(f'{world_size} process(es), device {device}')

# -----------------------------------------------------------------------------
# data and the schedule over it
def epoch_mask_ratio(epoch):  # reconstruction mask ratio of an epoch under the 'epoch' curriculum
    return masking.mask_ratio_schedule(epoch / max(1, math.ceil(epochs) - 1), mask_ratio, mask_ratio_end)


def epoch_batch_size(epoch):  # clips per rank per micro-step in an epoch
    if not adaptive_batch:
        return batch_size
    return masking.adaptive_batch_size(batch_size, epoch_mask_ratio(epoch), mask_ratio, mask_ratio_end)


class RandomBatches:
    """The bench's data through the data sources' interface (data.train_batches): one random (audio,
    image) batch again and again, nothing read; an epoch is `steps` optimiser steps."""

    def __init__(self, batch_size, steps, accumulation, audio_length, num_mel_bins, img_size):
        self.clips, self.skipped, self.batches = batch_size, 0, steps * accumulation
        self.shapes = (batch_size, audio_length, num_mel_bins), (batch_size, 3, img_size, img_size)

    def batches_per_epoch(self, epoch):
        return self.batches

    def layout(self):
        return {}

    def loader(self, epoch, batch, device):
        audio, image = (torch.randn(*shape, device=device) for shape in self.shapes)  # (B, L, F), (B, 3, H, W)
        while True:
            yield audio, image


eval_dataset = None
data_args = dict(audio_length=audio_length, num_mel_bins=num_mel_bins, img_size=img_size)
if bench:  # random tensors, nothing read; train_data has one interface whatever the source
    train_data = RandomBatches(batch_size, bench_warmup + bench_iters, gradient_accumulation_steps, **data_args)
else:
    for key in ('train_json',) + (('eval_json',) if eval_json else ()):
        path = globals()[key]
        if not path or not (os.path.isfile(path) or is_shard_set(path)):
            sys.exit(f'error: {key}={path!r} is neither a file nor a shard set. For a demo on '
                     f'built-in synthetic clips run\n  python scripts/synth.py --out data_synth '
                     f'&& python train.py config/demo.py\nfor real videos see '
                     f'`python scripts/prepare.py --help` and the README.')
    data_args['num_frames'] = num_frames
    batch_sizes = [epoch_batch_size(e) for e in range(math.ceil(epochs) or 1)]  # the last holds on
    train_data = train_batches(train_json, batch_sizes, seed=seed, rank=rank, world_size=world_size,
                               num_workers=num_workers, accumulation=gradient_accumulation_steps,
                               shuffle_buffer=shuffle_buffer, time_shift=time_shift, skip_bad=skip_bad,
                               bad_list=os.path.join(out_dir, 'bad_clips.txt') if master else '', **data_args)
    eval_dataset = AVDataset(eval_json, mode='eval', **data_args) if eval_json else None
    if eval_dataset is not None and len(eval_dataset) < world_size:
        sys.exit(f'error: eval_json={eval_json!r} has {len(eval_dataset)} clips, '
                 f'fewer than the {world_size} ranks that share it')


@functools.cache  # called every step; fixed once the data is known
def epoch_iters(epoch):  # optimiser steps in an epoch
    return train_data.batches_per_epoch(epoch) // gradient_accumulation_steps


def locate(it):  # iteration -> (epoch, steps of it already done): epochs may differ in length
    epoch = 0
    while it >= epoch_iters(epoch):
        it -= epoch_iters(epoch)
        epoch += 1
    return epoch, it


def iters_for(num_epochs):  # optimiser steps in the first num_epochs (fractional) epochs
    whole = int(num_epochs)
    return sum(epoch_iters(e) for e in range(whole)) + round((num_epochs - whole) * epoch_iters(whole))


if min(epoch_iters(e) for e in range(math.ceil(epochs) or 1)) == 0:
    largest = max(map(epoch_batch_size, range(math.ceil(epochs) or 1)))
    sys.exit(f'error: {train_data.clips} clips are fewer than one step ({largest} '
             f'x {gradient_accumulation_steps} x {world_size} ranks); lower batch_size')
max_iters = bench_warmup + bench_iters if bench else max_iters or iters_for(epochs)
warmup_iters = iters_for(warmup_epochs)
get_lr = functools.partial(warmup_cosine, total=max_iters, warmup=warmup_iters, start=learning_rate, end=min_lr)
get_momentum = functools.partial(warmup_cosine, total=max_iters, warmup=0, start=ema_momentum, end=ema_momentum_end)


def step_mask_ratio(it):  # reconstruction mask ratio of an iteration
    if mask_ratio_schedule == 'epoch':
        return epoch_mask_ratio(locate(it)[0])
    if mask_ratio_schedule == 'step':
        return masking.mask_ratio_schedule(it / max(1, max_iters - 1), mask_ratio, mask_ratio_end)
    return mask_ratio


# -----------------------------------------------------------------------------
# checkpoints and restarts
model_args = {f.name: globals()[f.name] for f in fields(ModelConfig) if f.name != 'global_token'}
model_args['global_token'] = method != 'cavmae'  # CAV-MAE style: mean-pooled patch tokens
# settings that fix what every step computes from which clips: a resumed run must keep them
resume_fixed = ('batch_size', 'gradient_accumulation_steps', 'epochs', 'warmup_epochs', 'max_iters',
                'method', 'mask_ratio', 'mask_ratio_schedule', 'mask_ratio_end', 'adaptive_batch',
                'contrastive_mask_ratio', 'contrastive_masking', 'learning_rate', 'min_lr',
                'ema_momentum', 'ema_momentum_end', 'seed', 'num_frames', 'time_shift',
                'shuffle_buffer')
ckpt_path, prev_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'ckpt_prev.pt')
log_path = os.path.join(out_dir, 'log.jsonl')  # steps and retrieval
epochs_path = os.path.join(out_dir, 'epochs.jsonl')  # per epoch: the clips used and left out


def newest_checkpoint():
    """(path, checkpoint) of out_dir's newest readable checkpoint: ckpt.pt, else ckpt_prev.pt (an
    unreadable ckpt.pt is reported and moved aside); (None, None) if none, an exit if resume."""
    errors = []
    for path in filter(os.path.isfile, (ckpt_path, prev_path)):
        try:
            ckpt = read_checkpoint(path)
        except ValueError as e:
            errors.append(str(e))
            continue
        if errors and master:  # keep the bad file, but out of the rotation
            os.replace(ckpt_path, os.path.join(out_dir, 'ckpt_unreadable.pt'))
            print(f'warning: {errors[0]}\n  resuming from the previous checkpoint {path} instead '
                  f'(the unreadable {ckpt_path} is now ckpt_unreadable.pt)', file=sys.stderr)
        return path, ckpt
    if errors:
        sys.exit(f'error: no readable checkpoint in {out_dir}: ' + '; '.join(errors))
    if init_from == 'resume':
        sys.exit(f"error: init_from='resume' but {out_dir} holds no checkpoint ({ckpt_path})")
    return None, None


def resume_at(path, ckpt):
    """The checkpoint's iteration; exits unless its run is this one and unfinished."""
    layout = train_data.layout()  # mid-epoch resume: the same clips, ranks, (shards) loader workers
    then = {**ckpt['config'], **ckpt['model_args'], 'world_size': ckpt.get('world_size'),
            'train_clips': ckpt.get('train_clips'), 'data_layout': ckpt.get('data_layout', layout)}
    now = {**config, **model_args, 'world_size': world_size, 'train_clips': train_data.clips,
           'data_layout': layout}
    keys = (*model_args, *resume_fixed, 'world_size', 'train_clips', 'data_layout')
    changed = {k: (then.get(k), now[k]) for k in keys if then.get(k) != now[k]}
    if changed:
        sys.exit(f'error: cannot resume {path}: settings differ from the checkpoint (then, now): '
                 f'{changed}. They fix the model or which clips and schedule each step uses; for a '
                 f'new run from these weights use --init_from={path} and another out_dir.')
    it = ckpt['iter_num']
    if it >= max_iters:  # the checkpoint is the run's last
        if master:
            print(f'{path}: this run is finished ({it} of {max_iters} iterations); nothing to '
                  f'train. For a new run choose another out_dir.')
        if ddp:
            dist.destroy_process_group()
        sys.exit(0)
    if master:
        print(f'resuming {path} at iteration {it} of {max_iters}' + ('' if init_from == 'resume'
              else f' (init_from={init_from!r} starts only a new out_dir)'))
    return it


def start_log(path, it):
    """A log holds one run: a resume drops the records of the steps after its checkpoint (they run
    again); a fresh start moves an earlier log aside (a run that saved no checkpoint)."""
    if not master or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    if it == 0:
        n = 1
        while os.path.exists(f'{path}.{n}'):
            n += 1
        os.replace(path, f'{path}.{n}')
        print(f'{out_dir} holds {os.path.basename(path)} but no checkpoint: moved it to {path}.{n}')
        return
    lines, kept = open(path).read().splitlines(), []
    for line in lines:
        try:
            if json.loads(line).get('iter', 0) <= it:
                kept.append(line)
        except ValueError:  # a record cut short when the run was killed
            pass
    if len(kept) < len(lines):
        with open(path + '.tmp', 'w') as f:
            f.writelines(line + '\n' for line in kept)
        os.replace(path + '.tmp', path)
        print(f'{path}: dropped {len(lines) - len(kept)} records after iteration {it} (run again)')


def save_checkpoint(it):
    """Rank 0 writes a temporary file, then renames ckpt.pt to ckpt_prev.pt and the new file to
    ckpt.pt: a crash never leaves a half-written ckpt.pt, and a bad file leaves the one before."""
    if not master:
        return
    state = dict(model=raw_model.state_dict(), teacher=teacher.state_dict() if teacher is not None else None,
                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=it,
                 epoch=locate(it)[0], model_args=model_args, config=config, world_size=world_size,
                 train_clips=train_data.clips, data_layout=train_data.layout(), noise_gen=noise_gen.get_state())
    with open(ckpt_path + '.tmp', 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on the disk before the renames
    if os.path.isfile(ckpt_path):
        os.replace(ckpt_path, prev_path)
    os.replace(ckpt_path + '.tmp', ckpt_path)


ckpt_file, ckpt = newest_checkpoint()  # init_from='resume', or a restart into the run's out_dir
iter_num = resume_at(ckpt_file, ckpt) if ckpt is not None else 0
for path in (log_path, epochs_path):
    start_log(path, iter_num)

# -----------------------------------------------------------------------------
# model, teacher, optimiser
model = CAVMAESync(ModelConfig(**model_args))
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
elif init_from != 'scratch':
    if not os.path.isfile(init_from):
        sys.exit(f"error: init_from must be 'scratch', 'resume' or a checkpoint file; {init_from!r} is none of these")
    load_weights(model, init_from, verbose=master)  # ImageNet MAE, CAV-MAE, a release or train.py
model.to(device)
raw_model = model  # unwrapped: EMA source, checkpoints, evaluation
teacher = make_teacher(model) if method == 'tgdp' else None
if teacher is not None and ckpt is not None:
    teacher.load_state_dict(ckpt['teacher'])
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                             weight_decay=weight_decay, fused=True)  # one kernel, no temporaries
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if ckpt is not None:
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
if master:
    n_params = sum(p.numel() for p in model.parameters())
    print(f'model: {n_params / 1e6:.2f} M trainable parameters; '
          f'{epoch_iters(0)} iterations in the first epoch, {max_iters} in all')
teacher_forward = teacher.forward_teacher if teacher is not None else None
if compile:  # the sizes DiffMAViL's schedules change are dynamic (dynamic_size): one graph each
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error, never a silent eager step
    model = torch.compile(model, mode=compile_mode)
    if teacher is not None:
        teacher_forward = torch.compile(teacher.forward_teacher, mode=compile_mode)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def train_flops_per_clip(rec_mask_ratio):  # analytic: 3x forward for the student, 1x the teacher
    c = raw_model.config
    if method in ('sync', 'cavmae'):
        return 3 * sum(forward_flops(c, rec_mask_ratio, 'sync').values())
    contrastive = forward_flops(c, contrastive_mask_ratio, 'contrastive')
    contrastive.pop('patch_embed')  # forward embeds the patches once; both views gather from them
    student = sum(forward_flops(c, rec_mask_ratio, 'reconstruction').values()) + sum(contrastive.values())
    return 3 * student + (sum(forward_flops(c, 0.0, 'teacher').values()) if method == 'tgdp' else 0)


# -----------------------------------------------------------------------------
# one step
# Every random choice of a step (masks, Gumbel noise, diffusion noise) comes from one generator with
# the same state on all ranks: each draws the noise of the whole global batch and keeps its own rows
# (DistributedSampler's interleaving, global row i * world_size + rank), so a run computes the same
# masks for the same clips whatever the number of ranks, and the state is one tensor to checkpoint.
noise_gen = torch.Generator(device=device).manual_seed(seed)


def noise(B, *shape, draw=torch.rand, **kw):  # (B, *shape): this rank's rows of the global batch's
    return draw(world_size * B, *shape, generator=noise_gen, device=device, **kw)[rank::world_size]


def dynamic_size(*tensors, dim):
    """Compiled runs: the tensors' size along dim changes (DiffMAViL's schedules); it enters the
    first step's graph as a dynamic size, else each new value compiles again (up to the limit)."""
    for t in tensors:
        if compile and t is not None:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def losses_for(audio, image, rec_mask_ratio):
    """One micro-batch of the selected method -> (total loss, dict of detached terms)."""
    con_a = con_v = None  # the contrastive view; none for sync / cavmae (one view feeds both)
    B, Na, Nv = audio.shape[0], raw_model.num_patches_a, raw_model.num_patches_v
    if adaptive_batch:  # B changes per epoch
        dynamic_size(audio, image, dim=0)
    if method == 'tgdp':
        t_a, t_v, attn_a, attn_v = teacher_forward(audio, image)  # attention: (B, Na), (B, Nv)
        con_a = masking.contrastive_keep(contrastive_masking, attn_a, contrastive_mask_ratio, noise(B, Na))
        con_v = masking.contrastive_keep(contrastive_masking, attn_v, contrastive_mask_ratio, noise(B, Nv))
    elif method == 'dualpass':
        con_a = masking.random_masking(B, Na, contrastive_mask_ratio, noise=noise(B, Na))[0]
        con_v = masking.random_masking(B, Nv, contrastive_mask_ratio, noise=noise(B, Nv))[0]
    # the reconstruction view, made here outside the compiled model: a changing mask ratio changes
    # only the length of these index tensors, which the compiled graph takes as a dynamic size
    keep_a = masking.random_masking(B, Na, rec_mask_ratio, noise=noise(B, Na))[0]  # (B, ka)
    keep_v = masking.random_masking(B, Nv, rec_mask_ratio, noise=noise(B, Nv))[0]  # (B, kv)
    diffusion = None  # DiffMAViL's timestep per clip and noise per patch
    if diffused_mask_tokens:
        P = patch_size * patch_size
        t = noise(B, draw=lambda n, **kw: torch.randint(1, raw_model.alpha_bar.shape[0] + 1, (n,), **kw))
        eps_a = noise(B, Na, P, draw=torch.randn)  # (B, Na, p*p)
        diffusion = t, eps_a, noise(B, Nv, 3 * P, draw=torch.randn)  # eps_v: (B, Nv, p*p*3)
    if mask_ratio_schedule != 'none':  # ka, kv change per step or epoch
        dynamic_size(keep_a, keep_v, dim=1)
    if adaptive_batch:
        dynamic_size(keep_a, keep_v, con_a, con_v, *(diffusion or ()), dim=0)
    out = model(audio, image, keep_a, keep_v, con_a, con_v, diffusion)
    loss_con, con_acc = info_nce(out['g_a'], out['g_v'], temperature, contrastive_direction, contrastive_negatives)
    loss = rec_weight * out['loss'] + con_weight * loss_con
    terms = dict(con_acc=con_acc, rec=out['loss'], rec_a=out['loss_a'], rec_v=out['loss_v'], con=loss_con)
    if method == 'tgdp' and dis_weight > 0:
        terms['dis'] = distill_loss(out['g_a'], out['g_v'], t_a, t_v)
        loss = loss + dis_weight * terms['dis']
    terms['loss'] = loss
    return loss, {k: v.detach() for k, v in terms.items()}


def train_step(batches, rec_mask_ratio):
    """One optimiser step over gradient_accumulation_steps micro-batches -> (terms, flags): some
    rank saw a non-finite loss (the update is skipped), some rank got SIGTERM."""
    terms_sum = {}
    for micro_step in range(gradient_accumulation_steps):
        audio, image = next(batches)
        sync_grads = not ddp or micro_step == gradient_accumulation_steps - 1  # all-reduce last
        with (nullcontext() if sync_grads else model.no_sync()):
            with mixed_precision:
                loss, terms = losses_for(audio, image, rec_mask_ratio)
            scaler.scale(loss / gradient_accumulation_steps).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v / gradient_accumulation_steps
    flags = torch.tensor([float(not torch.isfinite(terms_sum['loss'])), float(stop_requested.is_set())], device=device)
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


# -----------------------------------------------------------------------------
# logging and evaluation
def log(record, path=log_path):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_step(it, terms, rec_mask_ratio, clips_s):
    """Means over the global batch (every rank joins the all-reduce) -> log.jsonl, progress bar."""
    values = torch.stack(list(terms.values())).float()
    if ddp:
        dist.all_reduce(values, op=dist.ReduceOp.AVG)
    if skip_bad:  # unreadable clips every rank replaced since the last record
        skipped = torch.tensor(float(train_data.skipped), device=device)
        train_data.skipped = 0
        if ddp:
            dist.all_reduce(skipped)
    if not master:
        return
    epoch = locate(it - 1)[0]
    mfu = None  # model FLOPs utilisation, GPU only
    if device_type == 'cuda':
        mfu = train_flops_per_clip(rec_mask_ratio) * clips_s / world_size / (peak_tflops * 1e12)
    record = {'iter': it, 'epoch': epoch, 'lr': get_lr(it - 1), 'mask_ratio': rec_mask_ratio,
              'batch_size': epoch_batch_size(epoch) * gradient_accumulation_steps * world_size,
              'clips_s': clips_s, 'mfu': mfu, **dict(zip(terms, values.tolist()))}
    if skip_bad:
        record['skipped_clips'] = int(skipped)
    log(record)
    shown = ' '.join(f'{k} {record[k]:.4f}' for k in ('loss', 'rec', 'con', 'dis') if k in record)
    tqdm.write(f"iter {it}: {shown} acc {record['con_acc']:.3f} lr {record['lr']:.2e} "
               f"{clips_s:.1f} clips/s" + (f' mfu {100 * mfu:.1f}%' if mfu is not None else ''))


def log_epoch(it):  # as an epoch begins: the clips its steps use and leave out (< one global batch)
    if master:
        epoch = locate(it)[0]
        steps, clips = epoch_iters(epoch), train_data.clips
        used = steps * gradient_accumulation_steps * epoch_batch_size(epoch) * world_size
        log({'iter': it, 'epoch': epoch, 'clips': clips, 'clips_used': used,
             'clips_left_out': clips - used}, epochs_path)
        tqdm.write(f'epoch {epoch}: {used} of {clips} clips, {clips - used} left out')


def evaluate_retrieval(it):
    """Held-out retrieval (diagonal mean over frames): every rank extracts the features of its
    contiguous share of the clips with loader workers, rank 0 gathers them in order and scores."""
    n = len(eval_dataset)
    share = Subset(eval_dataset, range(rank * n // world_size, (rank + 1) * n // world_size))
    feats = extract_features(raw_model, share, batch_size=max(1, batch_size // num_frames),
                             device=device, num_workers=num_workers, dtype=dtype)
    if ddp:
        parts = [None] * world_size if master else None
        dist.gather_object(feats, parts, dst=0, group=cpu_group)
        if master:
            feats = {k: torch.cat([p[k] for p in parts]) for k in ('g_a', 'g_v', 'labels')}
    if master:
        results = retrieval(feats, ('diag_mean',), device=device)['diag_mean']
        log({'iter': it, 'retrieval': results})
        tqdm.write(f'iter {it}: retrieval R@1/5/10 ' + '  '.join(
            f"{d} {r['R@1']:.1f}/{r['R@5']:.1f}/{r['R@10']:.1f}" for d, r in results.items()))


# -----------------------------------------------------------------------------
# the loop
stop_requested = threading.Event()  # set by SIGTERM (pre-emption): finish the step, save, exit
signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
if ckpt is not None:
    noise_gen.set_state(ckpt['noise_gen'])
    del ckpt
profiler = None
if bench and profile:
    # called when the active steps end (the profiler drops their events after that)
    def write_profile(prof):
        table = prof.key_averages().table(sort_by=f'{device_type}_time_total', row_limit=30)
        with open(os.path.join(out_dir, 'profile.txt'), 'w') as f:
            f.write(table)
    activity = torch.profiler.ProfilerActivity
    acts = [activity.CPU] + ([activity.CUDA] if device_type == 'cuda' else [])
    schedule = torch.profiler.schedule(wait=0, warmup=bench_warmup, active=bench_iters)
    profiler = torch.profiler.profile(activities=acts, on_trace_ready=write_profile, schedule=schedule)
    profiler.start()
model.train()
start_epoch, start_step = locate(iter_num)
batches = train_data.loader(start_epoch, start_step * gradient_accumulation_steps, device)
bar = tqdm(total=max_iters, initial=iter_num, disable=not master or bench, dynamic_ncols=True)


def shutdown():
    batches.close()  # loader workers ignore SIGTERM: shut them now (exit-time cleanup would hang)
    bar.close()
    if ddp:
        dist.barrier()  # together: a rank that leaves while rank 0 still saves can abort in gloo
        dist.destroy_process_group()


t_log, clips_since_log = time.time(), 0
if iter_num == 0 and not bench:
    log_epoch(0)
while iter_num < max_iters:
    if profiler is not None and iter_num:  # bench: the profiler steps as a step begins
        profiler.step()
    if bench and iter_num == bench_warmup:  # the clock starts (GPU: once the queued work is done)
        if device_type == 'cuda':
            torch.cuda.synchronize()
        t_bench = time.time()
    lr, rec_mask_ratio = get_lr(iter_num), step_mask_ratio(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    terms, (nonfinite, sigterm) = train_step(batches, rec_mask_ratio)
    if nonfinite:
        if master:
            values = {k: float(v) for k, v in terms.items()}
            print(f'error: non-finite loss at iteration {iter_num} ({values}); stopping. '
                  f'The last good checkpoint {ckpt_path} is untouched.', file=sys.stderr)
        shutdown()
        sys.exit(1)
    if teacher is not None:
        ema_update(teacher, raw_model, get_momentum(iter_num))
    clips_since_log += epoch_batch_size(locate(iter_num)[0]) * gradient_accumulation_steps * world_size
    iter_num += 1
    bar.update(1)
    if bench:  # no logs, evaluation or checkpoints: the report below
        continue
    if locate(iter_num)[1] == 0 and iter_num < max_iters:
        log_epoch(iter_num)
    if iter_num % log_interval == 0 or iter_num == max_iters:
        log_step(iter_num, terms, rec_mask_ratio, clips_since_log / (time.time() - t_log))
        t_log, clips_since_log = time.time(), 0
    if iter_num % eval_interval == 0 or iter_num == max_iters or sigterm:
        if eval_dataset is not None and not sigterm:
            evaluate_retrieval(iter_num)
        save_checkpoint(iter_num)
    if sigterm:
        if master:
            print(f'SIGTERM: saved {ckpt_path} at iteration {iter_num}; exiting', file=sys.stderr)
        break  # to the shutdown below (bench steps never get here)

if bench:
    if device_type == 'cuda':
        torch.cuda.synchronize()
    dt = time.time() - t_bench
    flops_per_clip = train_flops_per_clip(mask_ratio)
    clips_s = batch_size * gradient_accumulation_steps * bench_iters / dt
    tflops = flops_per_clip * clips_s / 1e12
    mem = f'{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB' if device_type == 'cuda' else 'n/a'
    mfu = f'{100 * tflops / peak_tflops:.1f}%' if device_type == 'cuda' else 'n/a'
    if profiler is not None:
        profiler.step()  # the last timed step ends: the profiler writes its table
        profiler.stop()
        print(f'profile of {bench_iters} steps (its overhead is in the timing above): '
              f'{os.path.join(out_dir, "profile.txt")}')
    # graphs dynamo compiled: one per compiled function (student, teacher); more = recompiles or
    # graph breaks, and the clips/s above are then partly compile time or eager steps
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs'] if compile else 'off'
    print('| method | batch | s/iter | clips/s | GFLOP/clip | TFLOP/s | MFU | peak mem | graphs |\n'
          '|---|---|---|---|---|---|---|---|---|\n'
          f'| {method} | {batch_size} | {dt / bench_iters:.3f} | {clips_s:.1f} '
          f'| {flops_per_clip / 1e9:.4g} | {tflops:.3g} | {mfu} | {mem} | {graphs} |')
shutdown()
