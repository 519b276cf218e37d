"""Every launch path of train.py, tiny: each method and each option (on top of tgdp and sync) runs, leaves a
checkpoint evaluate.py loads, gives the same losses and weights on 2 gloo ranks as in 1 process on the same
global batch, and SIGTERM + init_from='resume' gives the same weights as the uninterrupted run.
Each cell combines a few options, so that every method and every option gets all three checks (README: Tests)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import ROOT, TINY, killing_wrapper, load_ckpt, read_log

CURRICULUM = ['--mask_ratio=0.9', '--mask_ratio_end=0.8', '--mask_ratio_schedule=epoch', '--adaptive_batch=True']
CELLS = {  # name -> settings; 40 clips, batch 8 in 1 process = 4 per rank on 2 ranks
    'tgdp': ['--eval_interval=3'],  # + retrieval during training (eval_json below)
    'sync-diffused-clip-accum': ['--method=sync', '--diffused_mask_tokens=True', '--grad_clip=0.5',
                                 '--gradient_accumulation_steps=2'],
    'dualpass-cross': ['--method=dualpass', '--decoder_attention=cross'],
    'cavmae-curriculum': ['--method=cavmae', *CURRICULUM],
    'tgdp-random-diffused-accum': ['--contrastive_masking=random', '--diffused_mask_tokens=True',
                                   '--gradient_accumulation_steps=2'],
    'tgdp-gumbel-cross-nodis-clip': ['--contrastive_masking=gumbel', '--decoder_attention=cross', '--dis_weight=0.0',
                                     '--grad_clip=0.5'],
    'sync-curriculum-cross-v2a': ['--method=sync', *CURRICULUM, '--decoder_attention=cross',
                                  '--contrastive_direction=v2a'],
    'tgdp-curriculum-workers': [*CURRICULUM, '--num_workers=2', '--contrastive_masking=gumbel_proportional'],
    # tar shards: each rank and worker reads its own run of the epoch's clips, so 2 ranks see other batches
    'tgdp-shards-workers-accum': ['--train_json={shards}', '--eval_json={shards}', '--num_workers=2',
                                  '--gradient_accumulation_steps=2', '--shuffle_buffer=4'],
}
STEPS = ['--max_iters=6', '--epochs=2.0']  # the curriculum cells change batch (16 -> 8 clips) after 2 steps
TERMS = ('loss', 'rec', 'rec_a', 'rec_v', 'con', 'con_acc', 'dis')
TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth')
    subprocess.run([sys.executable, 'scripts/synth.py', '--out', str(out), '--num_clips', '40', '--seed', '0'],
                   cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, 'scripts/shard.py', '--data', str(out / 'train.json'), '--out', str(out / 'shards'),
                    '--shard_size', '5'], cwd=ROOT, check=True, capture_output=True)
    return out


def command(cell, synth, out_dir, *extra, launcher=(sys.executable,), batch_size=8):
    return [*launcher, 'train.py', *TINY, *STEPS, f'--batch_size={batch_size}', f'--train_json={synth / "train.json"}',
            f'--eval_json={synth / "train.json"}', f'--out_dir={out_dir}',
            *(arg.format(shards=synth / 'shards') for arg in CELLS[cell]), *extra]


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def one_process(synth, tmp_path_factory):
    """The uninterrupted single-process run of each cell, made once and shared by the tests below."""
    runs = {}

    def get(cell):
        if cell not in runs:
            out = tmp_path_factory.mktemp(cell)
            run(command(cell, synth, out))
            runs[cell] = out
        return runs[cell]
    return get


@pytest.fixture(scope='module')
def two_ranks(synth, tmp_path_factory):
    """The uninterrupted 2-rank run of each cell (batch 4 per rank), made once and shared."""
    runs = {}

    def get(cell):
        if cell not in runs:
            out = tmp_path_factory.mktemp(cell + '-2ranks')
            run(command(cell, synth, out, launcher=TORCHRUN, batch_size=4))
            runs[cell] = out
        return runs[cell]
    return get


def step_records(out_dir):
    return [r for r in read_log(out_dir) if 'loss' in r]


@pytest.mark.parametrize('cell', CELLS)
def test_single_process_run_leaves_a_checkpoint_evaluate_loads(cell, one_process, synth):
    from evaluate import extract_features, load_model, make_dataset
    out = one_process(cell)
    records = step_records(out)
    assert [r['iter'] for r in records] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in records)
    ckpt = load_ckpt(out)
    for weights in ('model', 'teacher') if ckpt['teacher'] is not None else ('model',):
        model = load_model(str(out / 'ckpt.pt'), weights=weights)
        assert model.state_dict().keys() <= ckpt[weights].keys()
        feats = extract_features(model, torch.utils.data.Subset(make_dataset(str(synth / 'train.json'), None,
                                                                             model.config), range(2)))
        assert feats['g_a'].shape == (2, 16, 48) and torch.isfinite(feats['g_v']).all()
    if cell.startswith('tgdp'):
        assert ckpt['teacher'] is not None
        assert ('dis' in records[0]) == ('--dis_weight=0.0' not in CELLS[cell])
    if 'shards' in cell:  # per epoch 2 steps of 2 x 8 clips: 8 of 40 left out, less than one step's 16
        epochs = [json.loads(line) for line in open(out / 'epochs.jsonl')]
        assert [(e['epoch'], e['clips_used'], e['clips_left_out']) for e in epochs] == [(0, 32, 8), (1, 32, 8), (2, 32, 8)]
    if 'curriculum' in cell:  # the batch and ratio follow the epoch: 2 steps of 16 clips at 0.9, then 8 at 0.8
        assert [(r['batch_size'], round(r['mask_ratio'], 6)) for r in records] == [(16, 0.9)] * 2 + [(8, 0.8)] * 4


@pytest.mark.parametrize('cell', CELLS)
def test_two_gloo_ranks_match_one_process(cell, one_process, two_ranks, synth):
    one, two = one_process(cell), two_ranks(cell)
    log1, log2 = step_records(one), step_records(two)
    assert len(log1) == len(log2) == 6
    if 'shards' in cell:  # other clips per batch by design: the ranks just keep in step (equal batch counts)
        steps = [[(r['iter'], r['epoch'], r['batch_size']) for r in log] for log in (log1, log2)]
        assert steps[0] == steps[1]
        return
    for r1, r2 in zip(log1, log2):
        assert r1['batch_size'] == r2['batch_size'] and r1['mask_ratio'] == r2['mask_ratio']
        for key in TERMS:
            if key in r1 or key in r2:
                assert abs(r1[key] - r2[key]) < 1e-4 * max(1.0, abs(r1[key])), (cell, r1['iter'], key, r1[key], r2[key])
    # Adam turns rounding noise in near-zero gradients into +-lr steps: judge the weights by the share that
    # moved apart by more than a thousandth of a step, and by the optimiser's first moments
    a, b = load_ckpt(one), load_ckpt(two)
    differ = sum((a['model'][k] - b['model'][k]).abs().gt(1e-6).sum().item() for k in a['model'])
    total = sum(v.numel() for v in a['model'].values())
    assert differ / total < 0.01, (cell, differ, total)
    for k, s1 in a['optimizer']['state'].items():
        s2 = b['optimizer']['state'][k]['exp_avg']
        assert torch.allclose(s1['exp_avg'], s2, rtol=1e-3, atol=1e-7), (cell, k, (s1['exp_avg'] - s2).abs().max())
    retrieval = [[r['retrieval'] for r in read_log(out) if 'retrieval' in r] for out in (one, two)]
    assert retrieval[0] == retrieval[1] and len(retrieval[0]) == (2 if cell == 'tgdp' else 1)  # every rank extracts


@pytest.mark.parametrize('cell', CELLS)
def test_sigterm_and_resume_equal_the_uninterrupted_run(cell, one_process, synth, tmp_path):
    full = one_process(cell)
    cmd = command(cell, synth, tmp_path)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    log_path, deadline = tmp_path / 'log.jsonl', time.time() + 120
    while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and 'SIGTERM: saved' in err, err[-2000:]
    stopped_at = load_ckpt(tmp_path)['iter_num']
    assert 2 <= stopped_at < 6, stopped_at
    run(cmd + ['--init_from=resume'])
    a, b = load_ckpt(full), load_ckpt(tmp_path)
    assert a['iter_num'] == b['iter_num'] == 6
    for part in ('model', 'teacher', 'optimizer'):
        if part == 'optimizer':
            a[part], b[part] = ({f'{k}.{n}': t for k, s in d['state'].items() for n, t in s.items()}
                                for d in (a[part], b[part]))
        assert (a[part] is None) == (b[part] is None)
        for k in a[part] or {}:
            assert torch.equal(a[part][k], b[part][k]), (cell, part, k)
    assert {r['iter']: r['loss'] for r in step_records(full)} == {r['iter']: r['loss'] for r in step_records(tmp_path)}


def test_a_rank_killed_mid_run_restarts_and_ends_as_the_uninterrupted_run(two_ranks, synth, tmp_path):
    """torchrun --max-restarts=1; rank 1 SIGKILLed in step 5 of 6 on the first attempt (checkpoint and
    retrieval at step 3): the restart, the same command, resumes the out_dir's checkpoint, and the run
    ends with the uninterrupted run's weights, optimiser state and log, bit for bit."""
    wrapper = killing_wrapper(tmp_path / 'kill.py', kill_at=5, rank='1')
    launcher = (*TORCHRUN, '--max-restarts=1', str(wrapper))
    cmd = command('tgdp', synth, tmp_path / 'out', launcher=launcher, batch_size=4)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,  # main's hangs
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'at iteration 3 of 6' in proc.stdout, proc.stdout[-2000:]
    full, out = two_ranks('tgdp'), tmp_path / 'out'
    a, b = load_ckpt(full), load_ckpt(out)
    assert a['iter_num'] == b['iter_num'] == 6
    for part in ('model', 'teacher'):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for k, s in a['optimizer']['state'].items():
        assert all(torch.equal(t, b['optimizer']['state'][k][n]) for n, t in s.items()), k
    timeless = [[{k: v for k, v in r.items() if k not in ('clips_s', 'mfu')} for r in read_log(d)]
                for d in (full, out)]
    assert timeless[0] == timeless[1]  # steps 4 and 5 logged once, as in the uninterrupted run


def test_loader_workers_live_across_epochs(synth, tmp_path):
    """Four epochs with 2 workers: the items come from the same 2 worker processes throughout."""
    pids = tmp_path / 'pids'
    code = ('import os, sys, runpy, data; get = data.AVDataset.__getitem__\n'
            'def spy(self, i):\n'
            f'    open({str(pids)!r}, "a").write(f"{{os.getpid()}} {{self.epoch}}\\n"); return get(self, i)\n'
            'data.AVDataset.__getitem__ = spy; sys.argv = ["train.py"] + sys.argv[1:]\n'
            'runpy.run_path("train.py", run_name="__main__")')
    run([sys.executable, '-c', code, *TINY, f'--train_json={synth / "train.json"}', f'--out_dir={tmp_path}',
         '--num_workers=2', '--epochs=4.0'])
    seen = [line.split() for line in pids.read_text().splitlines()]
    assert {0, 1, 2, 3} <= {int(epoch) for _, epoch in seen}  # (and items of epoch 4 prefetched before the end)
    assert len({pid for pid, _ in seen}) == 2 and str(os.getpid()) not in {pid for pid, _ in seen}


def test_resume_refuses_changed_schedule_settings(synth, tmp_path):
    run(command('tgdp', synth, tmp_path, '--max_iters=2'))
    proc = subprocess.run(command('tgdp', synth, tmp_path, '--max_iters=2', '--init_from=resume', '--batch_size=4',
                                  '--epochs=3.0', '--eval_interval=5'), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and 'cannot resume' in proc.stderr
    assert "'batch_size': (8, 4)" in proc.stderr and "'epochs': (2.0, 3.0)" in proc.stderr
    assert 'eval_interval' not in proc.stderr.split('cannot resume')[1].split('They fix')[0]  # allowed to change
    proc = subprocess.run(command('tgdp', synth, tmp_path, '--max_iters=2', '--init_from=resume', launcher=TORCHRUN),
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "'world_size': (1, 2)" in proc.stderr


def test_rising_mask_ratio_curriculum_is_an_error(synth, tmp_path):
    proc = subprocess.run(command('tgdp', synth, tmp_path, '--mask_ratio_schedule=step', '--mask_ratio=0.75',
                                  '--mask_ratio_end=0.8'), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and 'would raise the mask ratio from 0.75 to 0.8' in proc.stderr


def test_config_files_need_no_labels_and_name_existing_settings(tmp_path):
    # the shipped configs: every key is a train.py setting (a typo would exit with 'unknown setting')
    for name in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        proc = subprocess.run([sys.executable, 'train.py', f'config/{name}', '--device=cpu', '--backend=gloo',
                               '--train_json=/nonexistent.json', f'--out_dir={tmp_path}', '--bench=False'],
                              cwd=ROOT, capture_output=True, text=True)
        assert 'unknown setting' not in proc.stderr and 'train_json' in proc.stderr, (name, proc.stderr[-500:])


def test_retrieval_during_training_is_spread_over_the_ranks(synth, tmp_path):
    """Each of 2 ranks extracts the features of its half of eval_json with loader workers, and the process
    group waits timeout_minutes (an AudioSet-size evaluation outlasts NCCL's 10-minute default)."""
    spy_log = tmp_path / 'spy.txt'
    wrapper = tmp_path / 'spy_train.py'
    wrapper.write_text(
        'import os, sys, runpy\n'
        f'sys.path.insert(0, {ROOT!r})\n'
        'import evaluate, torch.distributed as dist\n'
        'extract, init = evaluate.extract_features, dist.init_process_group\n'
        'def spy_extract(model, dataset, batch_size=8, device="cpu", num_workers=0, dtype="float32"):\n'
        f'    open({str(spy_log)!r}, "a").write(f"extract {{dist.get_rank()}} {{len(dataset)}} {{num_workers}}\\n")\n'
        '    return extract(model, dataset, batch_size, device, num_workers, dtype)\n'
        'def spy_init(*args, **kw):\n'
        f'    open({str(spy_log)!r}, "a").write(f"timeout {{kw.get(\'timeout\')}}\\n")\n'
        '    return init(*args, **kw)\n'
        'evaluate.extract_features, dist.init_process_group = spy_extract, spy_init\n'
        'sys.argv = ["train.py"] + sys.argv[1:]\n'
        f'runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")\n')
    cmd = command('tgdp', synth, tmp_path, '--max_iters=1', '--num_workers=1', '--timeout_minutes=90',
                  launcher=TORCHRUN, batch_size=4)
    run([*TORCHRUN, str(wrapper), *cmd[len(TORCHRUN) + 1:]])
    lines = sorted(spy_log.read_text().splitlines())
    assert lines == ['extract 0 20 1', 'extract 1 20 1', 'timeout 1:30:00', 'timeout 1:30:00'], lines
    assert [r['iter'] for r in read_log(tmp_path) if 'retrieval' in r] == [1]
