"""train.py end to end on CPU: config handling, DDP equivalence, exact resume, pre-emption, divergence,
torch.compile, the TG-DP step's wiring, and learning on the synthetic clips."""
import hashlib
import json
import math
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--dtype=float32', '--compile=False', '--backend=gloo', '--num_workers=0',
        '--audio_length=64', '--num_mel_bins=32', '--img_size=32', '--patch_size=8', '--embed_dim=48', '--num_heads=4',
        '--modality_depth=1', '--decoder_embed_dim=32', '--decoder_depth=1', '--decoder_num_heads=4',
        '--num_registers=2', '--batch_size=4', '--log_interval=1', '--eval_interval=1000', '--epochs=4.0',
        '--warmup_epochs=0.5', '--learning_rate=1e-3']


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth')
    subprocess.run([sys.executable, 'scripts/synth.py', '--out', str(out), '--num_clips', '40', '--seed', '0'],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def train(*args, out_dir, data=None, check=True, launcher=(sys.executable,)):
    data_args = [f'--train_json={data / "train.json"}'] if data is not None else []
    cmd = [*launcher, 'train.py', *TINY, *data_args, f'--out_dir={out_dir}', *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if check and proc.returncode != 0:
        raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=False)


def test_config_errors_are_clear(tmp_path):
    proc = train('--no_such_setting=1', out_dir=tmp_path, check=False)
    assert proc.returncode != 0 and "unknown setting 'no_such_setting'" in proc.stderr
    proc = train('--batch_size=2.5', out_dir=tmp_path, check=False)
    assert proc.returncode != 0 and 'batch_size must be int' in proc.stderr
    proc = train('--method=tgdpp', out_dir=tmp_path, check=False)
    assert proc.returncode != 0 and "method must be" in proc.stderr
    proc = train(out_dir=tmp_path, check=False)  # no train_json
    assert proc.returncode != 0 and 'python scripts/synth.py' in proc.stderr


def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(synth, tmp_path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    train('--batch_size=8', '--max_iters=1', out_dir=one, data=synth)
    train('--batch_size=4', '--max_iters=1', out_dir=two, data=synth,
          launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))
    log1, log2 = read_log(one)[0], read_log(two)[0]
    for key in ('loss', 'rec', 'con', 'dis'):
        assert abs(log1[key] - log2[key]) < 1e-5 * max(1.0, abs(log1[key])), key
    # Adam's first moment after one step is (1 - beta1) * gradient: compare the gradients
    s1, s2 = load_ckpt(one)['optimizer']['state'], load_ckpt(two)['optimizer']['state']
    assert s1.keys() == s2.keys() and len(s1) > 50
    for k in s1:
        assert torch.allclose(s1[k]['exp_avg'], s2[k]['exp_avg'], rtol=1e-4, atol=1e-9), k


def test_nonfinite_loss_stops_and_leaves_checkpoint_untouched(synth, tmp_path):
    train('--max_iters=4', out_dir=tmp_path, data=synth)
    ckpt = load_ckpt(tmp_path)
    ckpt['iter_num'] = 2  # as if saved at iteration 2 of the same run
    ckpt['model']['blocks_a.0.attn.qkv.weight'].fill_(float('nan'))  # a diverged state
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    digest = hashlib.sha256((tmp_path / 'ckpt.pt').read_bytes()).hexdigest()
    proc = train('--max_iters=4', '--init_from=resume', out_dir=tmp_path, data=synth, check=False)
    assert proc.returncode == 1 and 'non-finite loss at iteration 2' in proc.stderr
    assert 'untouched' in proc.stderr
    assert hashlib.sha256((tmp_path / 'ckpt.pt').read_bytes()).hexdigest() == digest


def test_compiled_and_bf16_training_match_eager_float32(synth, tmp_path):
    eager, compiled, bf16 = tmp_path / 'eager', tmp_path / 'compiled', tmp_path / 'bf16'
    train('--max_iters=3', out_dir=eager, data=synth)
    train('--max_iters=3', '--compile=True', out_dir=compiled, data=synth)
    train('--max_iters=3', '--dtype=bfloat16', out_dir=bf16, data=synth)  # autocast, as on GPU
    for r_e, r_c in zip(read_log(eager), read_log(compiled), strict=True):
        for key in ('loss', 'rec', 'con', 'dis'):
            assert abs(r_e[key] - r_c[key]) < 1e-3 * max(1.0, abs(r_e[key])), (r_e['iter'], key)
    # bf16 on the first step only: later, rounding flips some of the teacher's top-k choices
    r_e, r_b = read_log(eager)[0], read_log(bf16)[0]
    for key in ('loss', 'rec', 'con', 'dis'):
        assert abs(r_e[key] - r_b[key]) < 2e-2 * max(1.0, abs(r_e[key])), (key, r_e[key], r_b[key])
    assert r_e['loss'] != r_b['loss']  # autocast really computed in bf16


def test_tgdp_step_uses_teacher_topk_and_moves_teacher_by_ema(synth, tmp_path, monkeypatch):
    import model as model_module
    seen = {'priority': [], 'keep': [], 'ema': []}
    teacher_fwd, student_fwd, ema = (model_module.CAVMAESync.forward_teacher,
                                     model_module.CAVMAESync.forward, model_module.ema_update)

    def spy_teacher(self, audio, image):
        out = teacher_fwd(self, audio, image)
        assert not self.has_decoder  # the encoder-only teacher, never the student
        seen['priority'].append((out[2], out[3]))
        return out

    def spy_student(self, audio, image, rec_a, rec_v, keep_a, keep_v, *rest):  # keep: the contrastive view
        seen['keep'].append((keep_a, keep_v))
        return student_fwd(self, audio, image, rec_a, rec_v, keep_a, keep_v, *rest)

    def spy_ema(teacher, student, momentum):
        before = {k: p.clone() for k, p in teacher.named_parameters()}
        ema(teacher, student, momentum)
        seen['ema'].append((momentum, before, {k: p.detach().clone() for k, p in student.named_parameters()},
                            {k: p.clone() for k, p in teacher.named_parameters()}))

    monkeypatch.setattr(model_module.CAVMAESync, 'forward_teacher', spy_teacher)
    monkeypatch.setattr(model_module.CAVMAESync, 'forward', spy_student)
    monkeypatch.setattr(model_module, 'ema_update', spy_ema)
    monkeypatch.setattr(sys, 'argv', ['train.py', *TINY, f'--train_json={synth / "train.json"}', f'--out_dir={tmp_path}',
                                      '--max_iters=3', '--contrastive_mask_ratio=0.5', '--ema_momentum=0.9'])
    monkeypatch.chdir(ROOT)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        g = runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        signal.signal(signal.SIGTERM, handler)  # train.py installs its pre-emption handler

    assert len(seen['priority']) == len(seen['keep']) == len(seen['ema']) == 3
    for (p_a, p_v), (keep_a, keep_v) in zip(seen['priority'], seen['keep']):
        for p, keep in ((p_a, keep_a), (p_v, keep_v)):
            k = round(p.shape[1] * 0.5)
            assert keep.shape == (p.shape[0], k)
            assert torch.equal(keep.sort(1).values, p.argsort(1, descending=True)[:, :k].sort(1).values)
    for it, (m, before, student, after) in enumerate(seen['ema']):
        assert abs(m - g['get_momentum'](it)) < 1e-12 and 0.9 <= m < 1.0
        for k in after:
            assert torch.allclose(after[k], m * before[k] + (1 - m) * student[k], atol=1e-6)
        assert any(not torch.equal(after[k], before[k]) for k in after)  # it moved
    teacher = g['teacher']
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for group in g['optimizer'].param_groups for q in group['params'])


def test_demo_learns_cross_modal_retrieval(tmp_path):
    """config/demo.py on the default synthetic clips, shortened: held-out retrieval R@1 in both
    directions is several times chance."""
    data = tmp_path / 'synth'
    subprocess.run([sys.executable, 'scripts/synth.py', '--out', str(data), '--num_clips', '400', '--seed', '0'],
                   cwd=ROOT, check=True, capture_output=True)
    cmd = [sys.executable, 'train.py', 'config/demo.py', f'--train_json={data / "train.json"}',
           f'--eval_json={data / "eval.json"}', f'--out_dir={tmp_path / "out"}',
           '--max_iters=250', '--eval_interval=250']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_log(tmp_path / 'out')
    losses = [r['loss'] for r in records if 'loss' in r]
    assert losses[-1] < 0.8 * losses[0]
    retrieval = [r['retrieval'] for r in records if 'retrieval' in r][-1]
    num_eval = len(json.load(open(data / 'eval.json'))['data'])
    chance = 100.0 / num_eval
    print(f'\ndemo (250 iterations): {retrieval}, chance R@1 {chance:.2f}%')
    for direction in ('V->A', 'A->V'):
        assert retrieval[direction]['R@1'] >= 5 * chance, (direction, retrieval[direction], chance)


def test_adaptive_batch_keeps_visible_tokens_per_step():
    import masking
    for b0 in (4, 64, 128):
        for e in range(35):
            rho = masking.mask_ratio_schedule(e / 34, 0.9, 0.8)
            b = masking.adaptive_batch_size(b0, rho, 0.9, 0.8)
            # visible patches per step within one sample's worth of the least-masked setting's
            assert abs(b * (1 - rho) - b0 * (1 - 0.8)) <= 0.5 * (1 - rho) + 1e-9, (b0, e, b)
    assert masking.adaptive_batch_size(64, 0.9, 0.9, 0.8) == 128 and masking.adaptive_batch_size(64, 0.8, 0.9, 0.8) == 64


def test_diffmavil_options_train_with_curriculum_and_adaptive_batch(synth, tmp_path):
    """Each DiffMAViL option on: the logged mask ratio and batch follow the per-epoch schedule, epochs of
    different length add up to the iteration count, and the learning rate ends the cosine at max_iters."""
    import masking
    train('--epochs=3.0', '--mask_ratio=0.9', '--mask_ratio_end=0.8', '--mask_ratio_schedule=epoch',
          '--adaptive_batch=True', '--diffused_mask_tokens=True', '--decoder_attention=cross', out_dir=tmp_path, data=synth)
    records = [r for r in read_log(tmp_path) if 'loss' in r]
    ratios = {e: masking.mask_ratio_schedule(e / 2, 0.9, 0.8) for e in range(3)}
    sizes = {e: masking.adaptive_batch_size(4, ratios[e], 0.9, 0.8) for e in range(3)}
    assert sizes == {0: 8, 1: 5, 2: 4}
    assert {r['epoch'] for r in records} == {0, 1, 2}
    for r in records:
        assert abs(r['mask_ratio'] - ratios[r['epoch']]) < 1e-12 and r['batch_size'] == sizes[r['epoch']]
    assert len(records) == sum(40 // sizes[e] for e in range(3))  # 40 clips; log_interval=1
    assert records[-1]['lr'] < 0.05 * 1e-3 and all(math.isfinite(r['loss']) for r in records)
    step = tmp_path / 'step'
    train('--max_iters=6', '--mask_ratio=0.9', '--mask_ratio_end=0.8', '--mask_ratio_schedule=step', out_dir=step, data=synth)
    assert [round(r['mask_ratio'], 6) for r in read_log(step)] == [round(0.9 - 0.1 * i / 5, 6) for i in range(6)]
    proc = train('--adaptive_batch=True', out_dir=tmp_path / 'bad', data=synth, check=False)
    assert proc.returncode != 0 and "needs mask_ratio_schedule='epoch'" in proc.stderr


def test_bench_mode_prints_throughput_row_and_profile(tmp_path):
    # the GPU benchmark path (config/bench.py), run tiny on the CPU: random tensors, table row, profiler table
    from model import ModelConfig, forward_flops
    proc = train('config/bench.py', '--batch_size=4', '--bench_warmup=1', '--bench_iters=2', '--profile=True',
                 out_dir=tmp_path)
    row = [line for line in proc.stdout.splitlines() if line.startswith('| tgdp |')]
    assert len(row) == 1, proc.stdout
    cells = [c.strip() for c in row[0].strip('|').split('|')]
    assert cells[1] == '4' and float(cells[3]) > 0  # batch, clips/s
    c = ModelConfig(audio_length=64, num_mel_bins=32, img_size=32, patch_size=8, embed_dim=48, num_heads=4,
                    modality_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, num_registers=2)
    con = forward_flops(c, 0.5, 'contrastive')
    con_without_embedding = sum(v for k, v in con.items() if k != 'patch_embed')  # the student embeds once
    expected = (3 * sum(forward_flops(c, 0.75, 'reconstruction').values()) + 3 * con_without_embedding
                + sum(forward_flops(c, 0.0, 'teacher').values()))
    assert float(cells[4]) == float(f'{expected / 1e9:.4g}')  # GFLOP/clip
    assert cells[6] == cells[7] == 'n/a'  # MFU and peak memory are GPU-only
    assert 'aten::' in (tmp_path / 'profile.txt').read_text()


# -----------------------------------------------------------------------------
# restarts, checkpoints, unreadable clips (issue 22)

def killing_wrapper(path, kill_at, rank='0'):
    """A train.py launcher that SIGKILLs rank `rank` as its kill_at-th micro-batch's loss is computed
    (losses.info_nce, once per micro-batch), on a first attempt only (torchrun's restart count 0)."""
    path.write_text(
        'import os, runpy, signal, sys\n'
        f'sys.path.insert(0, {ROOT!r})\n'
        'import losses\n'
        'calls, info_nce = [0], losses.info_nce\n'
        'def spy(*args, **kw):\n'
        '    calls[0] += 1\n'
        f'    if (calls[0] == {kill_at} and os.environ.get("RANK", "0") == {rank!r}\n'
        '            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):\n'
        '        os.kill(os.getpid(), signal.SIGKILL)\n'
        '    return info_nce(*args, **kw)\n'
        'losses.info_nce = spy\n'
        'sys.argv = sys.argv[1:]  # launched as `python WRAPPER train.py ARGS`\n'
        f'runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")\n')
    return path


def same_run(a, b):
    """Two out_dirs hold the same final weights, optimiser state and logged losses, bit for bit."""
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca['iter_num'] == cb['iter_num']
    for part in ('model', 'teacher'):
        assert ca[part].keys() == cb[part].keys()
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    for k, s in ca['optimizer']['state'].items():
        assert all(torch.equal(t, cb['optimizer']['state'][k][n]) for n, t in s.items()), k
    timeless = [[{k: v for k, v in r.items() if k not in ('clips_s', 'mfu')} for r in read_log(d)] for d in (a, b)]
    assert timeless[0] == timeless[1]


RESTART = ['--max_iters=4', '--eval_interval=2', '--epochs=1.0']  # 10 steps an epoch: stops at 4


@pytest.fixture(scope='module')
def uninterrupted(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    train(*RESTART, out_dir=out, data=synth)
    return out


def test_a_restart_continues_and_a_finished_run_says_so(synth, uninterrupted, tmp_path):
    wrapper = killing_wrapper(tmp_path / 'kill.py', kill_at=4)  # in step 4: the checkpoint of step 2 is kept
    proc = train(*RESTART, out_dir=tmp_path / 'out', data=synth, check=False, launcher=(sys.executable, str(wrapper)))
    assert proc.returncode == -signal.SIGKILL
    assert load_ckpt(tmp_path / 'out')['iter_num'] == 2 and len(read_log(tmp_path / 'out')) == 3
    proc = train(*RESTART, out_dir=tmp_path / 'out', data=synth)  # the same command again: init_from='scratch'
    assert 'resuming' in proc.stdout and 'ckpt.pt at iteration 2 of 4' in proc.stdout
    assert 'dropped 1 records after iteration 2' in proc.stdout  # step 3's record: run again, not repeated
    same_run(uninterrupted, tmp_path / 'out')
    files = {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()}
    proc = train(*RESTART, out_dir=tmp_path / 'out', data=synth)
    assert 'this run is finished (4 of 4 iterations)' in proc.stdout and 'iter 1:' not in proc.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()} == files  # nothing rewritten
    epochs = [json.loads(line) for line in open(tmp_path / 'out' / 'epochs.jsonl')]
    assert epochs == [dict(iter=0, epoch=0, clips=40, clips_used=40, clips_left_out=0)]


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(synth, uninterrupted, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('ckpt.pt', 'ckpt_prev.pt', 'log.jsonl', 'epochs.jsonl'):
        (out / name).write_bytes((uninterrupted / name).read_bytes())
    assert load_ckpt(out)['iter_num'] == 4
    assert torch.load(out / 'ckpt_prev.pt', weights_only=True)['iter_num'] == 2  # the rotation kept it
    (out / 'ckpt.pt').write_bytes((out / 'ckpt.pt').read_bytes()[:100_000])  # a copy cut short
    proc = train(*RESTART, out_dir=out, data=synth)
    assert f'{out / "ckpt.pt"}: cannot be read' in proc.stderr
    assert f'resuming from the previous checkpoint {out / "ckpt_prev.pt"}' in proc.stderr
    assert (out / 'ckpt_unreadable.pt').stat().st_size == 100_000  # kept, out of the rotation
    same_run(uninterrupted, out)  # steps 3 and 4 recomputed from the older checkpoint


def test_skip_bad_skips_and_counts_unreadable_clips(synth, tmp_path):
    """One clip missing at start-up (dropped, listed) and one that goes bad mid-run (every load fails:
    replaced in its batch, counted in the log); without skip_bad the run stops naming the file."""
    data = tmp_path / 'data'
    entries = json.load(open(synth / 'train.json'))['data']
    for e in entries:
        e['wav'], e['video_path'] = str(synth / e['wav']), str(synth / e['video_path'])
    entries[0]['wav'] = str(tmp_path / 'deleted.wav')  # missing from the start
    data.mkdir()
    (data / 'train.json').write_text(json.dumps({'data': entries}))
    bad_id = entries[5]['video_id']
    wrapper = tmp_path / 'bad.py'
    wrapper.write_text(
        'import runpy, sys\n'
        f'sys.path.insert(0, {ROOT!r})\n'
        'import data\n'
        'load_frame = data.load_frame\n'
        'def spy(path, img_size, clip_id="", draft=False):\n'
        f'    if clip_id == {bad_id!r}:\n'
        '        raise data.ClipError(f"clip {clip_id!r}: cannot read frame file {path}: gone bad")\n'
        '    return load_frame(path, img_size, clip_id, draft)\n'
        'data.load_frame = spy\n'
        'sys.argv = sys.argv[1:]\n'
        f'runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")\n')
    launcher = (sys.executable, str(wrapper))
    proc = train('--max_iters=18', '--skip_bad=True', out_dir=tmp_path / 'out', data=data, launcher=launcher)
    assert (tmp_path / 'out' / 'bad_clips.txt').read_text() == entries[0]['video_id'] + '\n'
    epochs = [json.loads(line) for line in open(tmp_path / 'out' / 'epochs.jsonl')]
    assert [(e['clips'], e['clips_used'], e['clips_left_out']) for e in epochs] == [(39, 36, 3)] * 2
    # the bad clip is in every epoch's batches unless it is among the 3 left out: count its uses
    import data as data_module
    dataset = data_module.AVDataset(str(data / 'train.json'), skip_bad=True, bad_list='')
    at = [i for i, c in enumerate(dataset.clips) if c['id'] == bad_id][0]
    sampler = torch.utils.data.DistributedSampler(dataset, 1, 0, shuffle=True, seed=1337, drop_last=True)
    uses = 0
    for epoch, steps in ((0, 9), (1, 9)):
        sampler.set_epoch(epoch)
        uses += at in list(sampler)[:steps * 4]
    records = read_log(tmp_path / 'out')
    assert sum(r['skipped_clips'] for r in records if 'loss' in r) == uses > 0
    assert f"cannot read frame file" in proc.stderr and 'gone bad' in proc.stderr
    proc = train('--max_iters=18', out_dir=tmp_path / 'strict', data=data, check=False)
    assert proc.returncode != 0 and 'deleted.wav' in proc.stderr  # default: an error naming the file
