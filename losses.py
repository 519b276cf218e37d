"""
The three TG-DP objectives (SPEC section 4): masked reconstruction, symmetric InfoNCE with negatives
from every rank, and distillation towards the teacher's full-view global embeddings.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F


def mae_loss(pred, target, mask, norm_pix=False):
    """Per-patch MSE averaged over masked patches only. pred, target (B, N, P); mask (B, N), 1 = masked.
    norm_pix: targets normalised per patch (MAE's option)."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def gather_across_ranks(x):
    """(B, D) -> (world * B, D), differentiable: the backward pass sums every rank's gradient into the
    local slice, so each rank's embeddings get the gradient of every rank's loss terms."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_nn.all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def info_nce(g_a, g_v, temperature=0.05):
    """Symmetric InfoNCE on L2-normalised global embeddings g_a, g_v (B, D). Local queries are scored
    against the candidates of all ranks, so the negatives span the global batch. Returns (loss, accuracy):
    the mean of the two directions' cross-entropy and of their top-1 accuracies."""
    a, v = F.normalize(g_a.float(), dim=-1), F.normalize(g_v.float(), dim=-1)
    all_a, offset = gather_across_ranks(a)
    all_v, _ = gather_across_ranks(v)
    target = torch.arange(a.shape[0], device=a.device) + offset  # positives: same clip on this rank
    with torch.autocast(a.device.type, enabled=False):  # fp32 logits: bf16 would round cos/0.05 by ~0.1
        logits_av = a @ all_v.T / temperature  # (B, world*B): audio queries vs every visual candidate
        logits_va = v @ all_a.T / temperature
    loss = (F.cross_entropy(logits_av, target) + F.cross_entropy(logits_va, target)) / 2
    with torch.no_grad():
        acc = ((logits_av.argmax(dim=1) == target).float().mean() + (logits_va.argmax(dim=1) == target).float().mean()) / 2
    return loss, acc


def distill_loss(g_a, g_v, t_a, t_v):
    """Squared error between student (g) and teacher (t) global embeddings (B, D), mean over batch and
    features per modality, summed over the two modalities (SPEC section 4 decision)."""
    return F.mse_loss(g_a.float(), t_a.float()) + F.mse_loss(g_v.float(), t_v.float())
