"""torch.compile stays compiled for the whole run (issue 23): DiffMAViL's mask-ratio curriculum
('step', 'epoch') and adaptive batch change the reconstruction view's length and the batch size at
every step or epoch; each compiled function (the student's forward, the teacher's) must still be
compiled once, with no graph break, and never reach dynamo's recompile limit (after which it would
run eagerly). Lowered to 2 here: every run below gives the changing sizes at least 3 values."""
import json
import os
import subprocess
import sys

import pytest

from test_train import ROOT, TINY, synth  # noqa: F401 (synth: the 40-clip fixture)

LIMIT = 2
RUNNER = f'''
import json, os, runpy, sys
import torch, torch._dynamo
backend = os.environ['COMPILE_BACKEND']
if backend != 'inductor':  # the same dynamo tracing, guards and recompiles, without code generation
    compile_ = torch.compile
    torch.compile = lambda fn, mode=None: compile_(fn, backend=backend)
torch._dynamo.config.recompile_limit = {LIMIT}
sys.argv = ['train.py', *sys.argv[1:]]
runpy.run_path('train.py', run_name='__main__')
counters = torch._dynamo.utils.counters
print('DYNAMO ' + json.dumps({{k: dict(counters[k]) for k in ('frames', 'stats', 'graph_break')}}))
'''
STEP = ['--mask_ratio=0.9', '--mask_ratio_end=0.5', '--mask_ratio_schedule=step', '--max_iters=4']
# 3 epochs of ratios 0.9, 0.7, 0.5 and batches 20, 7, 4 (40 clips): 2 + 5 steps, then one of epoch 2
EPOCH = ['--mask_ratio=0.9', '--mask_ratio_end=0.5', '--mask_ratio_schedule=epoch', '--adaptive_batch=True',
         '--epochs=3.0', '--max_iters=8']


def compiled_run(tmp_path, *args, backend='aot_eager', base=TINY):
    """train.py --compile=True in a fresh process -> (dynamo's counters: frames, stats, graph_break;
    stdout; the log with dynamo's recompile reasons)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'COMPILE_BACKEND': backend, 'TORCH_LOGS': 'recompiles',
           'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'cache'),  # no sizes remembered from other runs
           'TORCH_DYNAMO_AUTOMATIC_DYNAMIC_LOCAL_PGO': '0'}
    cmd = [sys.executable, '-c', RUNNER, *base, '--compile=True', f'--out_dir={tmp_path / "out"}', *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f'{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}'
    line = [x for x in proc.stdout.splitlines() if x.startswith('DYNAMO ')]
    return json.loads(line[-1][len('DYNAMO '):]), proc.stdout, proc.stderr


def check(counters, log, functions):
    frames, graphs = counters['frames'], counters['stats'].get('unique_graphs', 0)
    assert counters['graph_break'] == {}, counters['graph_break']  # named reasons, if any
    # every compile attempt succeeded (a failed one runs eagerly), once per function: no recompile
    assert frames.get('total') == frames.get('ok') == graphs == functions, (counters, log[-3000:])
    assert 'Recompiling function' not in log, log[-3000:]


@pytest.mark.parametrize('method, args', [
    ('sync', [*EPOCH]),  # the real backend once: Inductor's lowering may add guards of its own
    ('tgdp', [*STEP, '--diffused_mask_tokens=True']),
    ('dualpass', [*STEP, '--decoder_attention=cross']),
    ('cavmae', [*EPOCH, '--decoder_attention=cross', '--diffused_mask_tokens=True']),
])
def test_schedules_compile_once_per_function(method, args, synth, tmp_path):
    backend = 'inductor' if method == 'sync' else 'aot_eager'
    counters, _, log = compiled_run(tmp_path, f'--train_json={synth / "train.json"}', f'--method={method}',
                                    *args, backend=backend)
    check(counters, log, functions=2 if method == 'tgdp' else 1)  # tgdp: + the teacher


def test_tgdp_epoch_curriculum_and_adaptive_batch(synth, tmp_path):
    counters, _, log = compiled_run(tmp_path, f'--train_json={synth / "train.json"}', '--method=tgdp',
                                    '--contrastive_masking=gumbel', *EPOCH)
    check(counters, log, functions=2)


def test_bench_prints_the_graphs_it_compiled(tmp_path):
    counters, stdout, log = compiled_run(tmp_path, 'config/bench.py', '--method=tgdp', '--batch_size=4',
                                         '--bench_warmup=1', '--bench_iters=2')
    check(counters, log, functions=2)
    row = [line for line in stdout.splitlines() if line.startswith('| tgdp |')]
    assert len(row) == 1 and row[0].strip('| ').split(' | ')[-1] == '2', stdout[-2000:]
