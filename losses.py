"""
The three TG-DP objectives: masked reconstruction (MAE), InfoNCE (by default symmetric with every
rank's negatives, as the TG-DP release; the CAV-MAE Sync release's one direction and one rank's
negatives are settings) and distillation towards the teacher's full-view global embeddings.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


def mae_loss(pred, target, mask, norm_pix=False):
    """Per-patch MSE, mean over masked patches: pred, target (B, N, P), mask (B, N) 1 = masked."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def gather_across_ranks(x):
    """(B, D) -> ((world * B, D), this rank's first row in it), differentiable: the backward pass
    sums every rank's gradient into the local slice (each rank's embeddings get every rank's terms)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_nn.all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def info_nce(g_a, g_v, temperature=0.05, direction='both', negatives='global'):
    """InfoNCE on L2-normalised global embeddings g_a, g_v (B, D) -> (loss, top-1 accuracy).
    direction: 'both' (mean of a->v and v->a: TG-DP's release, every method's default), 'v2a'
      (visual queries on audio candidates: CAV-MAE Sync's bidirect_contrast=False) or 'a2v'.
    negatives: 'global' (every rank's candidates, gradients through the gather: TG-DP's release)
      or 'local' (this rank's batch, as a DataParallel replica: CAV-MAE (Sync); results then
      depend on the number of ranks)."""
    if direction not in ('both', 'v2a', 'a2v') or negatives not in ('global', 'local'):
        raise ValueError(f"info_nce: direction must be 'both', 'v2a' or 'a2v' and negatives "
                         f"'global' or 'local', got {direction!r}, {negatives!r}")
    a, v = F.normalize(g_a.float(), dim=-1), F.normalize(g_v.float(), dim=-1)
    gather = gather_across_ranks if negatives == 'global' else (lambda x: (x, 0))
    losses, accs = [], []
    for query, cands, name in ((a, v, 'a2v'), (v, a, 'v2a')):
        if direction not in ('both', name):
            continue
        all_cands, offset = gather(cands)
        target = torch.arange(query.shape[0], device=query.device) + offset  # positives: the same clip on this rank
        # fp32 logits: bf16 would round cos / 0.05 by ~0.1
        with torch.autocast(query.device.type, enabled=False):
            logits = query @ all_cands.T / temperature  # (B, world*B) or (B, B)
        losses.append(F.cross_entropy(logits, target))
        with torch.no_grad():
            accs.append((logits.argmax(dim=1) == target).float().mean())
    return sum(losses) / len(losses), sum(accs) / len(accs)


def distill_loss(g_a, g_v, t_a, t_v):
    """Squared error between student (g) and teacher (t) global embeddings (B, D): mean over batch
    and features, summed over the two modalities. The mean is this project's decision (TG-DP does
    not say): it keeps the loss on the reconstruction loss's scale."""
    return F.mse_loss(g_a.float(), t_a.float()) + F.mse_loss(g_v.float(), t_v.float())
