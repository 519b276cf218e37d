"""
One TG-DP training step, ours (model.CAVMAESync) against the released style (tests/release_model.py), full
paper-size model, fp32 eager on CPU, same batch, same weights, same masks, same work:
  teacher forward (full, unmasked) -> guided keep (top-k, 50%) -> reconstruction pass (75%) -> contrastive
  pass -> InfoNCE + distillation -> backward -> Adam -> EMA update of the teacher.
Ours: forward_teacher (explicit attention only in the teacher's joint layer), one model() call doing the
reconstruction + contrastive passes, fused Adam (as train.py), ema_update (one _foreach_lerp_).
Released style: a deepcopy teacher running forward_feat with explicit attention everywhere, model(...) for the
reconstruction (mae weight 1, contrast 0) and again for the contrastive view (mae weight 0: no decoder, but
forward_encoder still runs all three joint passes), Adam over requires_grad parameters, loop-style EMA.
Steps are interleaved (alternating which goes first); warm-up 1, then the median of --repeats.

    python tests/bench_release.py [--batch 2] [--repeats 3] [--threads N] [--profile] [--tiny]
"""
import argparse
import copy
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import masking  # noqa: E402
from losses import distill_loss, info_nce  # noqa: E402
from model import CAVMAESync, ModelConfig, block_flops, ema_update, forward_flops, make_teacher  # noqa: E402
from release_model import ReleaseCAVMAE, release_state_dict_from_ours  # noqa: E402

TINY = dict(audio_length=64, num_mel_bins=32, img_size=32, patch_size=8, embed_dim=48, num_heads=4, modality_depth=2,
            joint_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_registers=2)
PHASES = ('teacher', 'forward', 'backward', 'adam', 'ema')
MOMENTUM, CON_W, REC_RATIO, CON_RATIO = 0.996, 0.1, 0.75, 0.5


def rss_mib(field):  # 'VmRSS' (now) or 'VmHWM' (peak since the last reset)
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float('nan')


def reset_peak():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class Ours:
    name = 'ours'

    def __init__(self, cfg):
        torch.manual_seed(0)
        self.model = CAVMAESync(cfg).train()
        self.teacher = make_teacher(self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=5e-7,
                                    fused=True)

    def step(self, a, v, na, nv, t):
        t0 = time.perf_counter()
        t_a, t_v, p_a, p_v = self.teacher.forward_teacher(a, v)
        keep_a, keep_v = masking.guided_keep(p_a, CON_RATIO), masking.guided_keep(p_v, CON_RATIO)
        rec_a = masking.random_masking(na.shape[0], na.shape[1], REC_RATIO, noise=na)[0]
        rec_v = masking.random_masking(nv.shape[0], nv.shape[1], REC_RATIO, noise=nv)[0]
        t1 = time.perf_counter()
        out = self.model(a, v, rec_a, rec_v, keep_a, keep_v)
        loss = out['loss'] + CON_W * info_nce(out['g_a'], out['g_v'])[0] + distill_loss(out['g_a'], out['g_v'], t_a, t_v)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        ema_update(self.teacher, self.model, MOMENTUM)
        t5 = time.perf_counter()
        for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            t[k].append(dt)
        return loss.item()


class Release:
    name = 'release'

    def __init__(self, cfg, ours_model):
        self.model = ReleaseCAVMAE(cfg).train()
        self.model.load_state_dict(release_state_dict_from_ours(ours_model.state_dict()))  # same function
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                    betas=(0.95, 0.999), weight_decay=5e-7)

    def step(self, a, v, na, nv, t):
        t0 = time.perf_counter()
        with torch.no_grad():
            t_a, t_v, p_a, p_v = self.teacher.forward_teacher(a, v)
        keep_a, keep_v = masking.guided_keep(p_a, CON_RATIO), masking.guided_keep(p_v, CON_RATIO)  # 'ranked_masking'
        t1 = time.perf_counter()
        rec = self.model(a, v, REC_RATIO, REC_RATIO, mae_loss_weight=1.0, contrast_loss_weight=0.0, noise_a=na, noise_v=nv)
        con = self.model(a, v, mae_loss_weight=0.0, contrast_loss_weight=CON_W, keep_a=keep_a, keep_v=keep_v)
        loss = rec['loss'] + con['loss'] + F.mse_loss(con['g_a'], t_a) + F.mse_loss(con['g_v'], t_v)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        t4 = time.perf_counter()
        with torch.no_grad():
            for p_t, p_s in zip(self.teacher.parameters(), self.model.parameters()):
                p_t.mul_(MOMENTUM).add_(p_s, alpha=1 - MOMENTUM)
        t5 = time.perf_counter()
        for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            t[k].append(dt)
        return loss.item()


def profile(impl, batch_args, rows=25):
    from torch.profiler import ProfilerActivity, profile as prof
    t = {k: [] for k in PHASES}
    with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        impl.step(*batch_args, t)
    print(f'\n--- profile: {impl.name}, one step ---')
    print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows))
    print(p.key_averages(group_by_input_shape=True).table(sort_by='self_cpu_time_total', row_limit=rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave the default)')
    ap.add_argument('--profile', action='store_true', help='after timing, profile one step of each')
    ap.add_argument('--tiny', action='store_true', help='smoke test on a tiny config')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(**TINY) if args.tiny else ModelConfig()
    B = args.batch
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, fp32 eager CPU, '
          'ours Adam fused, '
          f'{args.repeats} timed steps each after 1 warm-up')

    rss0 = rss_mib('VmRSS')
    ours = Ours(cfg)
    rss1 = rss_mib('VmRSS')
    rel = Release(cfg, ours.model)
    rss2 = rss_mib('VmRSS')
    n_ours = sum(p.numel() for p in ours.model.parameters())
    n_rel = sum(p.numel() for p in rel.model.parameters())
    print(f'parameters: ours {n_ours / 1e6:.2f} M trainable; release {n_rel / 1e6:.2f} M '
          f'({sum(p.numel() for p in rel.model.parameters() if p.requires_grad) / 1e6:.2f} M requires_grad)')
    print(f'RSS after building model + teacher: ours +{rss1 - rss0:.0f} MiB, release +{rss2 - rss1:.0f} MiB')

    g = torch.Generator().manual_seed(0)
    Na, Nv = ours.model.num_patches_a, ours.model.num_patches_v
    a = torch.randn(B, cfg.audio_length, cfg.num_mel_bins, generator=g)
    v = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)

    times = {impl.name: {k: [] for k in PHASES} for impl in (ours, rel)}
    peaks = {impl.name: [] for impl in (ours, rel)}
    can_reset = reset_peak()
    for i in range(1 + args.repeats):
        na, nv = torch.rand(B, Na, generator=g), torch.rand(B, Nv, generator=g)  # same masks for both
        order = (ours, rel) if i % 2 == 0 else (rel, ours)
        losses = {}
        for impl in order:
            base = rss_mib('VmRSS')
            reset_peak()
            losses[impl.name] = impl.step(a, v, na, nv, times[impl.name])
            peaks[impl.name].append(rss_mib('VmHWM') - base)
        total = {n: sum(times[n][k][-1] for k in PHASES) for n in times}
        print(f'step {i}{" (warm-up)" if i == 0 else ""}: ours {total["ours"]:.2f} s, release {total["release"]:.2f} s; '
              f'loss ours {losses["ours"]:.5f} release {losses["release"]:.5f}', flush=True)

    med = {n: {k: statistics.median(times[n][k][1:]) for k in PHASES} for n in times}
    best = {n: min(sum(times[n][k][i] for k in PHASES) for i in range(1, 1 + args.repeats)) for n in times}
    steps = {n: statistics.median(sum(times[n][k][i] for k in PHASES) for i in range(1, 1 + args.repeats)) for n in times}
    print(f'\n{"seconds per step":<18}{"ours":>10}{"release":>10}{"ours/rel":>10}')
    for k in PHASES:
        o, r = med['ours'][k], med['release'][k]
        print(f'{k:<18}{o:>10.3f}{r:>10.3f}{o / r:>10.2f}')
    print(f'{"step (median)":<18}{steps["ours"]:>10.3f}{steps["release"]:>10.3f}{steps["ours"] / steps["release"]:>10.2f}')
    print(f'{"step (best)":<18}{best["ours"]:>10.3f}{best["release"]:>10.3f}{best["ours"] / best["release"]:>10.2f}')
    # each timed step of ours ran next to one of the release's: their ratio cancels slow drifts of a shared machine
    pair = [sum(times['ours'][k][i] for k in PHASES) / sum(times['release'][k][i] for k in PHASES) for i in range(1, 1 + args.repeats)]
    print(f'{"paired ratio":<18}{"median":>10}{statistics.median(pair):>20.2f}   (each pair: {" ".join(f"{r:.2f}" for r in pair)})')
    print(f'{"clips / s":<18}{B / steps["ours"]:>10.2f}{B / steps["release"]:>10.2f}')
    if can_reset:
        print(f'{"step peak RSS MiB":<18}{max(peaks["ours"][1:]):>10.0f}{max(peaks["release"][1:]):>10.0f}'
              '   (above the RSS before the step)')
    print(f'process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (both implementations)')

    # analytic FLOPs per clip (matmuls; student forward + backward = 3x forward)
    f = lambda passes, r: sum(forward_flops(cfg, r, passes).values())  # noqa: E731
    teacher, rec, con = f('teacher', 0.0), f('reconstruction', REC_RATIO), f('contrastive', CON_RATIO)
    ours_total = teacher + 3 * (rec + con)
    # the release: every token's output in the last joint block (teacher and contrastive pass), and its unused joint passes
    full_joint = sum(cfg.joint_depth * block_flops(1 + masking.num_keep(n, CON_RATIO), cfg.embed_dim, cfg.mlp_ratio) for n in (Na, Nv))
    extra = forward_flops(cfg, REC_RATIO, 'sync')['joint_global'] + forward_flops(cfg, CON_RATIO, 'reconstruction')['joint_fused']
    rel_total = f('full', 0.0) + 3 * (rec + con - forward_flops(cfg, CON_RATIO, 'contrastive')['joint_global'] + full_joint) + extra
    print(f'analytic GFLOPs per clip: ours {ours_total / 1e9:.1f} (teacher {teacher / 1e9:.1f} + student 3 x {(rec + con) / 1e9:.1f}), '
          f'release {rel_total / 1e9:.1f}: ratio {ours_total / rel_total:.3f}')

    if args.profile:
        na, nv = torch.rand(B, Na, generator=g), torch.rand(B, Nv, generator=g)
        for impl in (ours, rel):
            profile(impl, (a, v, na, nv))


if __name__ == '__main__':
    main()
