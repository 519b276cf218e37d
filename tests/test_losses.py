import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import distill_loss, info_nce


def slow_info_nce(a, v, tau, direction='both'):
    """Float64 loop: each direction's cross-entropy, one query at a time."""
    a = [x / math.sqrt(sum(float(y) ** 2 for y in x)) for x in a.double()]
    v = [x / math.sqrt(sum(float(y) ** 2 for y in x)) for x in v.double()]
    B = len(a)
    pairs = {'both': ((a, v), (v, a)), 'a2v': ((a, v),), 'v2a': ((v, a),)}[direction]
    total, correct = 0.0, 0
    for queries, cands in pairs:
        for i in range(B):
            scores = [float((queries[i] * cands[j]).sum()) / tau for j in range(B)]
            total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
            correct += int(max(range(B), key=lambda j: scores[j]) == i)
    return total / (len(pairs) * B), correct / (len(pairs) * B)


@pytest.mark.parametrize('direction', ['both', 'a2v', 'v2a'])
def test_info_nce_matches_float64_loop(direction):
    torch.manual_seed(0)
    a, v = torch.randn(12, 16), torch.randn(12, 16)
    v[:6] = a[:6] + 0.3 * v[:6]  # some pairs aligned so accuracy is not trivially 0
    v[6] = a[7]  # audio 7 is visual 6's best match: the two directions' accuracies differ
    loss, acc = info_nce(a, v, 0.05, direction)
    ref_loss, ref_acc = slow_info_nce(a, v, 0.05, direction)
    assert abs(loss.item() - ref_loss) < 1e-4 * max(1.0, ref_loss)
    assert abs(acc.item() - ref_acc) < 1e-6 and ref_acc > 0


def test_v2a_is_the_sync_release_contrastive_loss():
    """CAV-MAE Sync's forward_contrastive (bidirect_contrast=False), transcribed: log-softmax over the audio
    axis (dim 0) of the audio x visual score matrix, the diagonal = each visual query's own audio."""
    torch.manual_seed(2)
    a, v = torch.randn(10, 16), torch.randn(10, 16)
    v[:5] = a[:5] + 0.5 * v[:5]
    an, vn = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    total = an @ vn.T / 0.05
    nce = -torch.mean(torch.diag(F.log_softmax(total, dim=0)))
    c_acc = (torch.argmax(F.softmax(total, dim=0), dim=0) == torch.arange(10)).float().mean()
    loss, acc = info_nce(a, v, 0.05, direction='v2a', negatives='local')
    assert torch.allclose(loss, nce, atol=1e-5) and torch.equal(acc, c_acc)
    assert not torch.allclose(info_nce(a, v, 0.05, direction='a2v')[0], nce, atol=1e-3)


def test_distill_loss_is_mean_squared_error_summed_over_modalities():
    a, v, ta, tv = (torch.randn(4, 8) for _ in range(4))
    ref = ((a - ta) ** 2).sum() / 32 + ((v - tv) ** 2).sum() / 32
    assert torch.allclose(distill_loss(a, v, ta, tv), ref)


SETTINGS = [('both', 'global'), ('v2a', 'local'), ('both', 'local')]


def _worker(rank, world, init_file, a, v, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    B = a.shape[0] // world
    out = []
    for direction, negatives in SETTINGS:
        la = a[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        lv = v[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss, acc = info_nce(la, lv, 0.05, direction, negatives)
        # DDP averages gradients over ranks; do the same by hand
        (loss / world).backward()
        grads = torch.cat([la.grad, lv.grad], 1)
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        gathered = [torch.zeros_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        out.append({'losses': torch.stack(losses), 'grads': torch.cat(gathered)})
    if rank == 0:
        torch.save(out, os.path.join(out_dir, 'out.pt'))
    dist.destroy_process_group()


def test_info_nce_two_gloo_ranks_global_and_local_negatives(tmp_path):
    """global: 2 ranks == 1 process on the whole batch. local: each rank's loss is InfoNCE over its own half
    only (float64 loop), and its gradients are those of the mean of the ranks' losses."""
    torch.manual_seed(0)
    a, v = torch.randn(8, 16), torch.randn(8, 16)
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), a, v, str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / 'out.pt')
    for (direction, negatives), res in zip(SETTINGS, got):
        ga, gv = a.clone().requires_grad_(True), v.clone().requires_grad_(True)
        if negatives == 'global':
            loss, _ = info_nce(ga, gv, 0.05, direction)
            assert abs(res['losses'].mean().item() - loss.item()) < 1e-5
        else:
            halves = [slow_info_nce(a[i:i + 4], v[i:i + 4], 0.05, direction)[0] for i in (0, 4)]
            assert torch.allclose(res['losses'].double(), torch.tensor(halves, dtype=torch.float64), atol=1e-5)
            loss = sum(info_nce(ga[i:i + 4], gv[i:i + 4], 0.05, direction, 'local')[0] for i in (0, 4)) / 2
        loss.backward()
        # each rank's gradient: d(mean loss)/d(its own embeddings), including the terms where they are negatives
        assert torch.allclose(res['grads'], torch.cat([ga.grad, gv.grad], 1), atol=1e-6), (direction, negatives)
    assert not torch.allclose(got[0]['grads'], got[2]['grads'], atol=1e-4)  # local negatives do change the gradient


def test_info_nce_logits_stay_float32_under_autocast():
    torch.manual_seed(1)
    a, v = torch.randn(16, 32), torch.randn(16, 32)
    ref, _ = info_nce(a, v, 0.05)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, _ = info_nce(a, v, 0.05)
    assert torch.equal(got, ref)
