"""
Which patches stay visible. Every view is an index tensor keep (B, k) of visible patches, k fixed by
the ratio. train.py makes them outside the compiled model, so a changing ratio (DiffMAViL's
curriculum) changes only a tensor length that torch.compile takes as one dynamic size.
"""
import torch
import torch.nn.functional as F


def num_keep(num_patches, mask_ratio):
    """Visible patches at a mask ratio: k = round(N * (1 - ratio)), at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f'mask ratio must be in [0, 1), got {mask_ratio}')
    return max(1, round(num_patches * (1.0 - mask_ratio)))


def gather(x, keep):
    """x (B, N, D), keep (B, k) -> the kept rows (B, k, D)."""
    return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def place(rows, keep, base):
    """gather's inverse: base (B, N, D), cast to the rows' dtype, with rows (B, k, D) at keep."""
    return base.to(rows.dtype).scatter(1, keep.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), rows)


def mask_of(keep, num_patches):
    """keep (B, k) -> mask (B, N), 1 = masked, 0 = visible, on keep's device."""
    return torch.ones(keep.shape[0], num_patches, device=keep.device).scatter_(1, keep, 0.0)


def masked_indices(keep, num_patches):
    """The complement of keep (B, k): masked patch indices (B, N - k), ascending."""
    mask = mask_of(keep, num_patches)  # (B, N)
    return mask.argsort(dim=1, stable=True)[:, keep.shape[1]:]  # stable: the k zeros, then in order


def random_masking(batch_size, num_patches, mask_ratio, device=None, noise=None):
    """MAE's random masking -> keep (B, k), mask (B, N) (1 = masked): the k smallest of uniform
    noise (B, N), optionally the caller's (train.py draws it for the global batch, so that masks do
    not depend on how the batch is split across ranks)."""
    k = num_keep(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    keep = noise.argsort(dim=1)[:, :k]  # (B, k)
    return keep, mask_of(keep, num_patches)


def teacher_priority(attention):
    """TG-DP's patch priority: the teacher's attention of each patch to the global token (B, N)
    (forward_teacher), normalised over the patches."""
    return attention / attention.sum(dim=1, keepdim=True)


def guided_keep(priority, mask_ratio):
    """TG-DP's distinct guided mask: keep the k patches of highest teacher priority (B, N)."""
    return priority.topk(num_keep(priority.shape[1], mask_ratio), dim=1).indices


def gumbel_keep(priority, mask_ratio, noise=None):
    """contrastive_masking='gumbel_proportional' (this project's reading): Gumbel-top-k draws k
    patches without replacement, with probability proportional to priority (B, N) > 0, any scale."""
    noise = torch.rand_like(priority) if noise is None else noise
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0)))
    k = num_keep(priority.shape[1], mask_ratio)
    return (priority.clamp_min(1e-20).log() + gumbel).topk(k, dim=1).indices


def gumbel_score_keep(scores, mask_ratio, noise=None, temperature=1.0, eps=1e-12):
    """contrastive_masking='gumbel' (the TG-DP paper: "Gumbel noise is added to the teacher scores
    before top-k") as the TG-DP release computes it (get_patch2cls_rank(mode='prob')): top-k of
    log_softmax(scores / temperature) + Gumbel noise, scores (B, N) the teacher's raw attention (not
    normalised). log_softmax shifts each row by a constant, so this ranks scores / temperature +
    noise: weights well below 1 against noise of std 1.28 make the choice nearly uniform."""
    noise = torch.rand_like(scores) if noise is None else noise
    gumbel = -torch.log(-torch.log(noise.clamp(eps, 1.0 - eps)))
    logp = F.softmax(scores.float() / max(temperature, eps), dim=1).clamp_min(eps).log()  # release
    return (logp + gumbel).topk(num_keep(scores.shape[1], mask_ratio), dim=1).indices


CONTRASTIVE_MASKINGS = ('guided', 'gumbel', 'gumbel_proportional', 'random')


def contrastive_keep(method, attention, mask_ratio, noise=None):
    """Visible patches (B, k) of the contrastive view from the teacher's raw attention (B, N)
    (forward_teacher): 'guided' (guided_keep), 'gumbel' (gumbel_score_keep), 'gumbel_proportional'
    (gumbel_keep) or 'random'. Only 'gumbel' reads the scale: teacher_priority's normalisation is a
    per-row factor under a top-k (a constant under a log), changing no choice beyond rounding."""
    if method == 'gumbel':
        return gumbel_score_keep(attention, mask_ratio, noise)
    if method == 'guided':
        return guided_keep(teacher_priority(attention), mask_ratio)
    if method == 'gumbel_proportional':
        return gumbel_keep(teacher_priority(attention), mask_ratio, noise)
    if method == 'random':
        B, N = attention.shape
        return random_masking(B, N, mask_ratio, attention.device, noise)[0]
    raise ValueError(f'contrastive masking must be one of {CONTRASTIVE_MASKINGS}, got {method!r}')


def mask_ratio_schedule(progress, rho1, rho2):
    """DiffMAViL curriculum: the mask ratio linear from rho1 (progress 0) to rho2 (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return rho1 + (rho2 - rho1) * progress


def adaptive_batch_size(batch_size, mask_ratio, rho1, rho2):
    """DiffMAViL adaptive batch: B_e = (1 - min(rho1, rho2)) / (1 - rho_e) * B_0, so that the
    visible tokens per step, B_e * (1 - rho_e), stay about those of the least-masked setting."""
    return max(1, round((1.0 - min(rho1, rho2)) / (1.0 - mask_ratio) * batch_size))
