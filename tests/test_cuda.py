"""The GPU checklist, skipped without CUDA. On a GPU machine, one command:
    python -m pytest -s -q tests/test_cuda.py
prints the bench rows of the full-size model (config/bench.py, tgdp and sync at batch 64) and checks, for every
method, one compiled bf16 step with fused Adam and SDPA (flash / memory-efficient kernels: head dim 64, bf16)
against the eager float32 step, the packed two-view encoder and the embedding-only joint block under those
kernels, a 1-rank NCCL torchrun run with retrieval during training, and (test_compile's check at GPU
shapes, Inductor, bf16) that DiffMAViL's curriculum and adaptive batch keep every method's step
compiled once per function; the bench rows show the graphs compiled (one per compiled function)."""
import os
import subprocess
import sys

import pytest
import torch

from test_compile import EPOCH, STEP, check, compiled_run
from test_train import ROOT, read_log, synth  # noqa: F401 (synth: the 40-clip fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='the GPU checklist needs CUDA')
# small, but with the kernels' shapes: head dim 64 in the encoders and the decoder, 16-pixel patches
GPU_SMALL = ['--device=cuda', '--backend=nccl', '--num_workers=2', '--audio_length=128', '--num_mel_bins=128',
             '--img_size=64', '--embed_dim=256', '--num_heads=4', '--modality_depth=2', '--decoder_embed_dim=128',
             '--decoder_depth=1', '--decoder_num_heads=2', '--num_registers=4', '--batch_size=8', '--log_interval=1',
             '--eval_interval=1000', '--epochs=4.0', '--warmup_epochs=0.5', '--learning_rate=1e-4']
METHODS = ('tgdp', 'sync', 'dualpass', 'cavmae')


def train(*args, launcher=(sys.executable,)):
    cmd = [*launcher, 'train.py', *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}'
    return proc


@pytest.mark.parametrize('method', METHODS)
def test_compiled_bf16_step_matches_eager_float32(method, synth, tmp_path):
    common = [*GPU_SMALL, f'--method={method}', '--max_iters=1', f'--train_json={synth / "train.json"}']
    train(*common, '--compile=False', '--dtype=float32', f'--out_dir={tmp_path / "eager"}')
    train(*common, '--compile=True', '--dtype=bfloat16', f'--out_dir={tmp_path / "fast"}')
    r_e, r_f = read_log(tmp_path / 'eager')[0], read_log(tmp_path / 'fast')[0]
    for key in ('loss', 'rec', 'con') + (('dis',) if method == 'tgdp' else ()):
        assert abs(r_e[key] - r_f[key]) < 3e-2 * max(1.0, abs(r_e[key])), (method, key, r_e[key], r_f[key])
    # Adam's first moment after one step is (1 - beta1) x the gradient: compare the whole gradient
    ckpts = [torch.load(tmp_path / d / 'ckpt.pt', map_location='cpu', weights_only=False) for d in ('eager', 'fast')]
    g_e, g_f = (torch.cat([s['exp_avg'].flatten() for _, s in sorted(c['optimizer']['state'].items())]) for c in ckpts)
    rel = ((g_e - g_f).norm() / g_e.norm()).item()
    cos = torch.nn.functional.cosine_similarity(g_e, g_f, dim=0).item()
    print(f'\n{method}: first-step loss eager fp32 {r_e["loss"]:.5f}, compiled bf16 {r_f["loss"]:.5f}; '
          f'gradient relative error {rel:.4f}, cosine {cos:.5f}')
    assert cos > 0.99 and rel < 0.15, (method, rel, cos)


@pytest.mark.parametrize('method, args', [('tgdp', [*EPOCH, '--diffused_mask_tokens=True']),
                                          ('sync', [*STEP, '--decoder_attention=cross']),
                                          ('dualpass', [*EPOCH, '--decoder_attention=cross']),
                                          ('cavmae', [*STEP, '--diffused_mask_tokens=True'])])
def test_schedules_stay_compiled_at_gpu_shapes(method, args, synth, tmp_path):
    counters, _, log = compiled_run(tmp_path, *GPU_SMALL, '--dtype=bfloat16', f'--method={method}',
                                    f'--train_json={synth / "train.json"}', *args, backend='inductor', base=())
    check(counters, log, functions=2 if method == 'tgdp' else 1)
    print(f'\n{method} {args}: {counters["stats"]["unique_graphs"]} graphs, no recompile, no graph break')


def test_packed_encoder_and_embedding_only_block_under_flash_kernels():
    from model import CAVMAESync, ModelConfig
    torch.manual_seed(0)
    m = CAVMAESync(ModelConfig(audio_length=128, img_size=64, embed_dim=256, num_heads=4, modality_depth=2,
                               decoder_embed_dim=128, decoder_num_heads=2, num_registers=4)).cuda().eval()
    x = torch.randn(8, m.num_patches_v, 256, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        packed = m.encode_pair(x[:, :5], x[:, 5:], 'v')
        alone = m.encode(x[:, :5], 'v'), m.encode(x[:, 5:], 'v')
        g_fast, _ = m.joint(alone[0], 'v', tokens=False)  # n_out=1: the global token only
        g_full, _ = m.joint(alone[0], 'v', tokens=True)
    for p, a in zip(packed, alone):
        assert torch.allclose(p.float(), a.float(), atol=5e-2, rtol=5e-2)
    assert torch.allclose(g_fast.float(), g_full.float(), atol=5e-2, rtol=5e-2)


def test_one_rank_nccl_torchrun_with_retrieval(synth, tmp_path):
    train(*GPU_SMALL, '--max_iters=4', f'--train_json={synth / "train.json"}', f'--eval_json={synth / "train.json"}',
          f'--out_dir={tmp_path}', launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                              '--nproc_per_node=1'))
    records = read_log(tmp_path)
    assert [r['iter'] for r in records if 'loss' in r] == [1, 2, 3, 4]
    assert [r['iter'] for r in records if 'retrieval' in r] == [4]


@pytest.mark.parametrize('method', ('tgdp', 'sync'))
def test_full_size_bench_rows(method, tmp_path):
    proc = train('config/bench.py', f'--method={method}', '--batch_size=64', f'--out_dir={tmp_path}')
    rows = [line for line in proc.stdout.splitlines() if line.startswith(f'| {method} |')]
    assert len(rows) == 1, proc.stdout[-2000:]
    graphs = rows[0].strip('| ').split(' | ')[-1]  # one per compiled function: compiled clips/s
    assert graphs == ('2' if method == 'tgdp' else '1'), rows[0]
    print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n{rows[0]}')
    os.makedirs(os.path.join(ROOT, 'out'), exist_ok=True)
    with open(os.path.join(ROOT, 'out', 'gpu_checklist.md'), 'a') as f:  # collected for the README
        f.write(rows[0] + '\n')
