import math
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import distill_loss, info_nce


def slow_info_nce(a, v, tau):
    """Float64 loop: each direction's cross-entropy, one query at a time."""
    a = [x / math.sqrt(sum(float(y) ** 2 for y in x)) for x in a.double()]
    v = [x / math.sqrt(sum(float(y) ** 2 for y in x)) for x in v.double()]
    B = len(a)
    total, correct = 0.0, 0
    for queries, cands in ((a, v), (v, a)):
        for i in range(B):
            scores = [float((queries[i] * cands[j]).sum()) / tau for j in range(B)]
            total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
            correct += int(max(range(B), key=lambda j: scores[j]) == i)
    return total / (2 * B), correct / (2 * B)


def test_info_nce_matches_float64_loop():
    torch.manual_seed(0)
    a, v = torch.randn(12, 16), torch.randn(12, 16)
    v[:6] = a[:6] + 0.3 * v[:6]  # some pairs aligned so accuracy is not trivially 0
    loss, acc = info_nce(a, v, 0.05)
    ref_loss, ref_acc = slow_info_nce(a, v, 0.05)
    assert abs(loss.item() - ref_loss) < 1e-4 * max(1.0, ref_loss)
    assert abs(acc.item() - ref_acc) < 1e-6 and ref_acc > 0


def test_distill_loss_is_mean_squared_error_summed_over_modalities():
    a, v, ta, tv = (torch.randn(4, 8) for _ in range(4))
    ref = ((a - ta) ** 2).sum() / 32 + ((v - tv) ** 2).sum() / 32
    assert torch.allclose(distill_loss(a, v, ta, tv), ref)


def _worker(rank, world, init_file, a, v, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    B = a.shape[0] // world
    la = a[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    lv = v[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    loss, acc = info_nce(la, lv, 0.05)
    # DDP averages gradients over ranks; do the same by hand
    (loss / world).backward()
    grads = torch.cat([la.grad, lv.grad], 1)
    dist.all_reduce(loss)
    gathered = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    if rank == 0:
        torch.save({'loss': loss.item() / world, 'grads': torch.cat(gathered)}, os.path.join(out_dir, 'out.pt'))
    dist.destroy_process_group()


def test_info_nce_two_gloo_ranks_match_single_process(tmp_path):
    torch.manual_seed(0)
    a, v = torch.randn(8, 16), torch.randn(8, 16)
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), a, v, str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / 'out.pt')
    ga, gv = a.clone().requires_grad_(True), v.clone().requires_grad_(True)
    loss, _ = info_nce(ga, gv, 0.05)
    loss.backward()
    assert abs(got['loss'] - loss.item()) < 1e-5
    # each rank's gradient: d(global loss)/d(its own embeddings), including the terms where they are negatives
    assert torch.allclose(got['grads'], torch.cat([ga.grad, gv.grad], 1), atol=1e-6)


def test_info_nce_logits_stay_float32_under_autocast():
    torch.manual_seed(1)
    a, v = torch.randn(16, 32), torch.randn(16, 32)
    ref, _ = info_nce(a, v, 0.05)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, _ = info_nce(a, v, 0.05)
    assert torch.equal(got, ref)
