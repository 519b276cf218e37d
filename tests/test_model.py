import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import masking
from model import CAVMAESync, ModelConfig, convert_official_state_dict, ema_update, make_teacher

TINY = dict(audio_length=64, num_mel_bins=32, img_size=32, patch_size=8, embed_dim=48, num_heads=4,
            modality_depth=2, joint_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
            num_registers=2)


def tiny(**kw):
    torch.manual_seed(0)
    return CAVMAESync(ModelConfig(**{**TINY, **kw})).eval()


def inputs(cfg, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.audio_length, cfg.num_mel_bins, generator=g),
            torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g))


def views(m, B=3, ratio=0.75, noise_a=None, noise_v=None):
    """Random views keep_a (B, ka), keep_v (B, kv), as train.py draws them (torch's RNG without noise)."""
    return (masking.random_masking(B, m.num_patches_a, ratio, noise=noise_a)[0],
            masking.random_masking(B, m.num_patches_v, ratio, noise=noise_v)[0])


def contrastive_embeddings(m, a, v, keep_a, keep_v):
    """g_a, g_v of a view alone: its own encoder pass, the joint audio / visual passes."""
    enc_a = m.encode(masking.gather(m.embed_audio(a), keep_a), 'a')
    enc_v = m.encode(masking.gather(m.embed_image(v), keep_v), 'v')
    return m.joint(enc_a, 'a', tokens=False)[0], m.joint(enc_v, 'v', tokens=False)[0]


# --- shapes and size -------------------------------------------------------------

def test_tiny_shapes_every_pass():
    m = tiny()
    a, v = inputs(m.config)
    Na, Nv, D = m.num_patches_a, m.num_patches_v, m.config.embed_dim
    assert (Na, Nv) == ((32 // 8) * (64 // 8), (32 // 8) ** 2)
    rec = m(a, v, *views(m))
    assert rec['pred_a'].shape == (3, Na, 64) and rec['pred_v'].shape == (3, Nv, 192)
    assert rec['mask_a'].sum(1).tolist() == [Na - masking.num_keep(Na, 0.75)] * 3
    assert rec['g_a'].shape == (3, D) and rec['loss'].ndim == 0
    out = m(a, v, *views(m), *views(m, ratio=0.5))
    assert out['g_a'].shape == out['g_v'].shape == (3, D) and out['pred_v'].shape == (3, Nv, 192)
    t_a, t_v, p_a, p_v = m.forward_teacher(a, v)
    assert t_a.shape == (3, D) and p_a.shape == (3, Na) and p_v.shape == (3, Nv)
    assert (p_a > 0).all() and (p_a < 1).all()  # attention weights
    g_a, g_v, tok_a, tok_v = m.forward_features(a, v)
    assert tok_a.shape == (3, Na, D) and tok_v.shape == (3, Nv, D)


def test_patchify_round_trip_and_layout():
    m = tiny()
    a, v = inputs(m.config)
    assert torch.equal(m.unpatchify_audio(m.patchify_audio(a)), a)
    assert torch.equal(m.unpatchify_image(m.patchify_image(v)), v)
    # audio patch (f, t) holds mel bins f*p.. and frames t*p.., row-major over (freq, time)
    p, nt = 8, m.grid_a[1]
    f, t = 2, 5
    assert torch.equal(m.patchify_audio(a)[:, f * nt + t].view(-1, p, p), a[:, t * p:(t + 1) * p, f * p:(f + 1) * p].transpose(1, 2))


def test_paper_config_size_and_shapes(shared_dir):
    cfg = ModelConfig()
    assert (cfg.audio_length, cfg.num_mel_bins, cfg.img_size, cfg.embed_dim, cfg.modality_depth) == (416, 128, 224, 768, 11)
    m = CAVMAESync(cfg).eval()
    assert (m.num_patches_a, m.num_patches_v) == (208, 196)
    official, dropped = 0, 0
    for line in open(os.path.join(shared_dir, 'reference', 'official_state_dict_keys.tsv')):
        key, shape = line.rstrip('\n').split('\t')
        n = math.prod(eval(shape))
        official += n
        dropped += n if re.match(r'(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.', key) else 0
    ours = sum(t.numel() for t in m.state_dict().values())
    decoder = sum(t.numel() for k, t in m.state_dict().items() if k.startswith(('decoder', 'mask_token')))
    print(f'\nparameters: official layout {official / 1e6:.2f} M, ours {ours / 1e6:.2f} M '
          f'(dropped {dropped / 1e6:.3f} M unused LayerNorms), outside the decoder {(ours - decoder) / 1e6:.2f} M')
    assert official == 190_660_864 and ours == official - dropped
    with torch.no_grad():
        g_a, g_v, tok_a, tok_v = m.forward_features(torch.randn(1, 416, 128), torch.randn(1, 3, 224, 224))
    assert g_a.shape == (1, 768) and tok_a.shape == (1, 208, 768) and tok_v.shape == (1, 196, 768)


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match='audio_length'):
        ModelConfig(audio_length=100)


# --- positional embedding against the CAV-MAE numpy formula ------------------------

def test_sincos_matches_cavmae_numpy_formula():
    def ref(dim, gh, gw):  # CAV-MAE pos_embed.py, transcribed: meshgrid with w first
        grid = np.stack(np.meshgrid(np.arange(gw, dtype=float), np.arange(gh, dtype=float)), 0).reshape(2, 1, gh, gw)

        def one(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
            out = np.einsum('m,d->md', pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)
        return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)
    from model import sincos_pos_embed_2d
    assert np.allclose(sincos_pos_embed_2d(64, 8, 26).numpy(), ref(64, 8, 26), atol=1e-6)


# --- masking ---------------------------------------------------------------------

def test_random_masking_exact_counts_no_duplicates():
    for N, ratio in [(208, 0.75), (196, 0.75), (196, 0.5), (10, 0.0), (7, 0.9)]:
        keep, mask = masking.random_masking(16, N, ratio)
        k = masking.num_keep(N, ratio)
        assert keep.shape == (16, k) and k == max(1, round(N * (1 - ratio)))
        assert all(len(set(row.tolist())) == k for row in keep)
        assert (mask.sum(1) == N - k).all()
        assert (mask.gather(1, keep) == 0).all()
    assert masking.num_keep(208, 0.75) == 52 and masking.num_keep(196, 0.5) == 98



def test_random_masking_outputs_follow_the_noise_device():
    # train.py passes noise on the GPU and no device (dualpass): the mask must not be built on the CPU.
    # The meta device stands in for a GPU here: a CPU mask would fail in scatter_ with meta indices.
    keep, mask = masking.random_masking(4, 196, 0.5, noise=torch.rand(4, 196, device='meta'))
    assert keep.device.type == mask.device.type == 'meta' and mask.shape == (4, 196)

def test_guided_keeps_true_topk_and_gumbel_respects_k():
    torch.manual_seed(0)
    priority = torch.rand(8, 196).softmax(1)
    keep = masking.guided_keep(priority, 0.5)
    truth = priority.argsort(dim=1, descending=True)[:, :98]
    assert torch.equal(keep.sort(1).values, truth.sort(1).values)
    gum = masking.gumbel_keep(priority, 0.5)
    assert gum.shape == (8, 98) and all(len(set(r.tolist())) == 98 for r in gum)
    assert not torch.equal(gum.sort(1).values, keep.sort(1).values)
    rnd = masking.contrastive_keep('random', priority, 0.5)
    assert rnd.shape == (8, 98)
    with pytest.raises(ValueError, match='contrastive masking'):
        masking.contrastive_keep('topk', priority, 0.5)
    assert masking.contrastive_keep('gumbel_proportional', priority, 0.5).shape == (8, 98)


def test_gumbel_follows_priority():
    # a patch with most of the priority mass is kept far more often than a low-priority one
    priority = torch.full((4000, 10), 0.01)
    priority[:, 0] = 0.91
    keep = masking.gumbel_keep(priority, 0.9)  # k = 1
    frac0 = (keep[:, 0] == 0).float().mean().item()
    assert 0.85 < frac0 < 0.97


def test_release_gumbel_reading_ranks_raw_attention_plus_noise():
    """contrastive_masking='gumbel' = the TG-DP release's get_patch2cls_rank(mode='prob') (transcribed below:
    log of the clamped softmax + Gumbel noise, argsort descending, the first k kept); by the Gumbel-max trick
    its top-1 is patch i with probability softmax(scores)_i, far from the priority itself at attention scale."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 50, generator=g) * 0.05  # head-mean attention weights are small
    u = torch.rand(6, 50, generator=g)
    eps = 1e-12
    gumbel = -torch.log(-torch.log(torch.clamp(u, min=eps, max=1 - eps)))
    ranks = torch.argsort(torch.log(torch.clamp(F.softmax(scores, dim=-1), min=eps)) + gumbel, dim=1, descending=True)
    keep = masking.contrastive_keep('gumbel', scores, 0.5, u)
    assert torch.equal(keep.sort(1).values, ranks[:, :25].sort(1).values)

    raw = torch.full((20000, 10), 0.005)
    raw[:, 0] = 0.5  # patch 0 holds 91% of the normalised priority
    top1 = masking.gumbel_score_keep(raw, 0.9)[:, 0]  # k = 1
    expected = F.softmax(raw[0].double(), dim=0)  # P(top-1 = i), exact for Gumbel-max
    freq = torch.bincount(top1, minlength=10).double() / len(top1)
    assert (freq - expected).abs().max() < 0.015 and expected[0] < 0.16  # near random, unlike gumbel_proportional
    prop = masking.contrastive_keep('gumbel_proportional', raw / raw.sum(1, keepdim=True), 0.9)[:, 0]
    assert (prop == 0).double().mean() > 0.85


def test_teacher_returns_raw_attention_and_masking_normalises_it():
    m = tiny()
    a, v = inputs(m.config)
    _, _, r_a, r_v = m.forward_teacher(a, v)
    noise = torch.rand(3, m.num_patches_a, generator=torch.Generator().manual_seed(4))
    for r in (r_a, r_v):
        assert (r < 1).all() and (r > 0).all() and (r.sum(1) - 1).abs().min() > 1e-3  # raw weights
        p = masking.teacher_priority(r)
        assert torch.allclose(p.sum(1), torch.ones(3)) and torch.allclose(p * r.sum(1, keepdim=True), r)
        assert torch.equal(masking.contrastive_keep('guided', r, 0.5), masking.guided_keep(p, 0.5))
    # the normalised priority for gumbel_proportional, the raw attention for the release's gumbel
    for method, keep in (('gumbel_proportional', masking.gumbel_keep),
                         ('gumbel', masking.gumbel_score_keep)):
        want = keep(masking.teacher_priority(r_a) if method != 'gumbel' else r_a, 0.5, noise)
        assert torch.equal(masking.contrastive_keep(method, r_a, 0.5, noise), want)


def test_mask_ratio_schedule():
    assert masking.mask_ratio_schedule(0.0, 0.9, 0.8) == 0.9
    assert abs(masking.mask_ratio_schedule(0.5, 0.9, 0.8) - 0.85) < 1e-12
    assert masking.mask_ratio_schedule(1.0, 0.9, 0.8) == 0.8


# --- pass semantics ------------------------------------------------------------------

def test_teacher_pass_has_no_autograd_graph():
    m = tiny()
    a, v = inputs(m.config)
    a.requires_grad_(True)
    outs = m.forward_teacher(a, v)
    assert all(not t.requires_grad and t.grad_fn is None for t in outs)


def test_decoder_and_fused_pass_run_once_on_the_reconstruction_view_only():
    m = tiny()
    a, v = inputs(m.config)
    called = []
    for name in ('decoder_embed', 'decoder_blocks', 'decoder_norm', 'decoder_pred_a', 'decoder_pred_v', 'norm'):
        mods = getattr(m, name)
        for mod in (mods if isinstance(mods, torch.nn.ModuleList) else [mods]):
            mod.register_forward_hook(lambda *_, n=name: called.append(n))
    m.forward_teacher(a, v)
    m.forward_features(a, v)
    assert called == []
    keep_a, keep_v = views(m)
    seen = []
    m.decoder_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    m(a, v, keep_a, keep_v, *views(m, ratio=0.5))  # two views: the decoder sees the first only
    assert sorted(called) == sorted(['norm', 'decoder_embed', 'decoder_blocks', 'decoder_norm',
                                     'decoder_pred_a', 'decoder_pred_v'])
    assert seen == [keep_a.shape[1] + keep_v.shape[1]]


def test_only_teacher_joint_layer_computes_explicit_attention(monkeypatch):
    m = tiny()
    a, v = inputs(m.config)
    explicit = []
    from model import Attention
    orig = Attention.forward_with_weights

    def spy(self, *args, **kw):
        explicit.append(self)
        return orig(self, *args, **kw)
    monkeypatch.setattr(Attention, 'forward_with_weights', spy)
    m.forward_teacher(a, v)
    assert explicit == [m.blocks_u[-1].attn, m.blocks_u[-1].attn]
    explicit.clear()
    m.forward_features(a, v)
    m(a, v, *views(m), *views(m, ratio=0.5))
    assert explicit == []


def test_settings_that_would_be_ignored_raise():
    m = tiny()
    a, v = inputs(m.config)
    x = torch.randn(3, 10, m.config.embed_dim)
    with pytest.raises(ValueError, match='segments'):  # n_out applies to one sequence, not to packed views
        m.blocks_a[0](x, n_out=1, segments=[4, 6])
    keep_a, keep_v = views(m)
    with pytest.raises(ValueError, match='contrastive view of both modalities'):  # one view alone
        m(a, v, keep_a, keep_v, keep_a, None)
    t = torch.ones(3, dtype=torch.long)
    diffusion = (t, torch.zeros(3, m.num_patches_a, 64), torch.zeros(3, m.num_patches_v, 192))
    with pytest.raises(ValueError, match='diffused_mask_tokens is off'):
        m(a, v, keep_a, keep_v, diffusion=diffusion)


def test_joint_attention_equals_the_sdpa_joint_pass():
    m = tiny()
    a, _ = inputs(m.config)
    with torch.no_grad():
        enc = m.encode(m.embed_audio(a), 'a')
        g, attn = m.joint_attention(enc, 'a')
        g_sdpa, _ = m.joint(enc, 'a', tokens=False)
        g_full, _ = m.joint(enc, 'a', tokens=True)
    assert attn.shape == (3, 4, enc.shape[1], enc.shape[1]) and torch.allclose(attn.sum(-1), torch.ones(()))
    assert torch.allclose(g, g_sdpa, atol=1e-5) and torch.allclose(g, g_full, atol=1e-5)


def test_teacher_priority_is_attention_to_global_key():
    m = tiny()
    a, v = inputs(m.config)
    _, _, p_a, _ = m.forward_teacher(a, v)
    # recompute by hand: joint block audio pass with an explicit softmax
    with torch.no_grad():
        x = m.encode(m.embed_audio(a), 'a')
        blk = m.blocks_u[0]
        h = blk.norm1_a(x)
        B, N, D = h.shape
        q, k, _ = blk.attn.qkv(h).view(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // 4), -1)
        ref = attn[:, :, 1:, 0].mean(1)
    assert torch.allclose(p_a, ref, atol=1e-7)


def test_sync_single_pass_shares_one_encoding():
    m = tiny()
    a, v = inputs(m.config)
    keep_a, keep_v = views(m)
    calls = []
    for blocks in (m.blocks_a, m.blocks_v):
        blocks[0].register_forward_hook(lambda *_: calls.append(1))
    out = m(a, v, keep_a, keep_v)
    assert len(calls) == 2  # one encoder pass per modality
    # the same as a second view equal to the first, and as that view's own contrastive passes
    two = m(a, v, keep_a, keep_v, keep_a, keep_v)
    g_a, g_v = contrastive_embeddings(m, a, v, keep_a, keep_v)
    assert torch.allclose(out['loss'], two['loss'], atol=1e-6)
    for g in (two['g_a'], g_a):
        assert torch.allclose(out['g_a'], g, atol=1e-5)
    assert torch.allclose(out['g_v'], g_v, atol=1e-5)


def test_two_pass_forward_embeds_once_and_equals_the_separate_passes():
    m = tiny()
    a, v = inputs(m.config)
    g = torch.Generator().manual_seed(2)
    noise_a, noise_v = torch.rand(3, m.num_patches_a, generator=g), torch.rand(3, m.num_patches_v, generator=g)
    keep_a, keep_v = views(m, ratio=0.5)
    rec_a, rec_v = views(m, ratio=0.75, noise_a=noise_a, noise_v=noise_v)
    calls = []
    m.patch_embed_a.register_forward_hook(lambda *_: calls.append('a'))
    m.patch_embed_v.register_forward_hook(lambda *_: calls.append('v'))
    out = m(a, v, rec_a, rec_v, keep_a, keep_v)
    assert calls == ['a', 'v']  # both passes share one patch embedding per modality
    rec = m(a, v, rec_a, rec_v)
    g_a, g_v = contrastive_embeddings(m, a, v, keep_a, keep_v)
    assert torch.allclose(out['loss'], rec['loss'], atol=1e-6)
    assert torch.allclose(out['g_a'], g_a, atol=1e-6) and torch.allclose(out['g_v'], g_v, atol=1e-6)


def test_reconstruction_loss_only_on_masked_patches():
    from losses import mae_loss
    pred, target = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
    mask = torch.zeros(2, 10)
    mask[:, :3] = 1
    base = mae_loss(pred, target, mask)
    pred2 = pred.clone()
    pred2[:, 3:] += 100.0  # visible patches do not count
    assert torch.equal(base, mae_loss(pred2, target, mask))
    ref = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b in range(2) for i in range(3)) / 6
    assert torch.allclose(base, ref)
    normed = mae_loss(pred, target, mask, norm_pix=True)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(normed, mae_loss(pred, t, mask))


def test_global_token_off_mean_pools_patches():
    m = tiny(global_token=False, num_registers=0)
    assert not hasattr(m, 'cls_token_a')
    a, v = inputs(m.config)
    g_a, g_v, tok_a, tok_v = m.forward_features(a, v)
    assert tok_a.shape[1] == m.num_patches_a and torch.allclose(g_a, tok_a.mean(1), atol=1e-6)
    out = m(a, v, *views(m))
    assert out['g_v'].shape == g_v.shape
    with pytest.raises(ValueError, match='global_token'):
        m.forward_teacher(a, v)


# --- inference properties ------------------------------------------------------------

def test_forward_features_deterministic_and_batch_independent():
    m = tiny()
    a, v = inputs(m.config, B=4)
    with torch.no_grad():
        full = m.forward_features(a, v)
        again = m.forward_features(a, v)
        one = m.forward_features(a[2:3], v[2:3])
    for x, y, z in zip(full, again, one):
        assert torch.equal(x, y)
        assert torch.allclose(x[2:3], z, atol=1e-5)


def test_forward_features_under_torch_compile():
    m = tiny()
    a, v = inputs(m.config)
    compiled = torch.compile(m.forward_features)
    with torch.no_grad():
        ref = m.forward_features(a, v)
        got = compiled(a, v)
    for x, y in zip(ref, got):
        assert torch.allclose(x, y, atol=1e-4)


# --- teacher -------------------------------------------------------------------------

def test_teacher_is_encoder_only_copy_and_ema_moves_it():
    m = tiny().train()
    t = make_teacher(m)
    assert not any(k.startswith('decoder') or k == 'mask_token' for k in t.state_dict())
    assert all(not p.requires_grad for p in t.parameters())
    for k, val in t.state_dict().items():
        assert torch.equal(val, m.state_dict()[k])
    before = {k: p.clone() for k, p in t.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ema_update(t, m, 0.9)
    student = dict(m.named_parameters())
    for k, p in t.named_parameters():
        assert torch.allclose(p, 0.9 * before[k] + 0.1 * student[k], atol=1e-6)


# --- official checkpoints ------------------------------------------------------------

def official_like(shared_dir):
    sd = {}
    g = torch.Generator().manual_seed(0)
    for line in open(os.path.join(shared_dir, 'reference', 'official_state_dict_keys.tsv')):
        key, shape = line.rstrip('\n').split('\t')
        sd['module.' + key] = torch.randn(*eval(shape), generator=g) * 0.02
    return sd


def test_official_checkpoint_converts_strictly_and_round_trips(shared_dir):
    sd = official_like(shared_dir)
    converted = convert_official_state_dict(sd)
    with torch.device('meta'):
        m = CAVMAESync(ModelConfig())
    m.load_state_dict(converted, strict=True, assign=True)
    back = m.state_dict()
    for k, val in back.items():
        assert torch.equal(val, sd['module.' + k])
    # without the DataParallel prefix too
    assert convert_official_state_dict({k[7:]: val for k, val in sd.items()}).keys() == converted.keys()


def test_official_conversion_names_bad_keys(shared_dir):
    sd = official_like(shared_dir)
    renamed = dict(sd)
    renamed['module.blocks_u.0.attn.qkv.weight_renamed'] = renamed.pop('module.blocks_u.0.attn.qkv.weight')
    with pytest.raises(KeyError, match='qkv.weight_renamed'):
        convert_official_state_dict(renamed)
    missing = dict(sd)
    del missing['module.norm_a.weight']
    with pytest.raises(KeyError, match='norm_a.weight'):
        convert_official_state_dict(missing)
    wrong = dict(sd)
    wrong['module.cls_token_a'] = torch.zeros(1, 2, 768)
    with pytest.raises(ValueError, match='cls_token_a'):
        convert_official_state_dict(wrong)


def reference_official_features(sd, cfg, audio, image):
    """The official model's inference written from its state dict with plain tensor ops: every official
    block (unused LayerNorms present), explicit softmax attention, no module code of ours."""
    sd = {k[len('module.'):]: val for k, val in sd.items()}
    p, H, R = cfg.patch_size, cfg.num_heads, cfg.num_registers

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + '.weight'], sd[name + '.bias'], eps=1e-5)  # nn.LayerNorm's default, as released

    def block(x, pre, sfx=''):
        h = ln(x, f'{pre}.norm1{sfx}')
        B, N, D = h.shape
        qkv = F.linear(h, sd[f'{pre}.attn.qkv.weight'], sd[f'{pre}.attn.qkv.bias']).reshape(B, N, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (D // H) ** -0.5).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), sd[f'{pre}.attn.proj.weight'], sd[f'{pre}.attn.proj.bias'])
        h = ln(x, f'{pre}.norm2{sfx}')
        h = F.linear(F.gelu(F.linear(h, sd[f'{pre}.mlp.fc1.weight'], sd[f'{pre}.mlp.fc1.bias'])), sd[f'{pre}.mlp.fc2.weight'], sd[f'{pre}.mlp.fc2.bias'])
        return x + h

    a = F.conv2d(audio.unsqueeze(1).transpose(2, 3), sd['patch_embed_a.proj.weight'], sd['patch_embed_a.proj.bias'], stride=p)
    a = a.flatten(2).transpose(1, 2) + sd['pos_embed_a'] + sd['modality_a']
    v = F.conv2d(image, sd['patch_embed_v.proj.weight'], sd['patch_embed_v.proj.bias'], stride=p)
    v = v.flatten(2).transpose(1, 2) + sd['pos_embed_v'] + sd['modality_v']
    B = a.shape[0]
    a = torch.cat([sd['cls_token_a'].expand(B, -1, -1), a, sd['register_tokens'][:R].expand(B, -1, -1)], 1)
    v = torch.cat([sd['cls_token_v'].expand(B, -1, -1), v, sd['register_tokens'][R:].expand(B, -1, -1)], 1)
    for i in range(cfg.modality_depth):
        a, v = block(a, f'blocks_a.{i}'), block(v, f'blocks_v.{i}')
    a, v = a[:, :-R], v[:, :-R]
    for i in range(cfg.joint_depth):
        a, v = block(a, f'blocks_u.{i}', '_a'), block(v, f'blocks_u.{i}', '_v')
    a, v = ln(a, 'norm_a'), ln(v, 'norm_v')
    return a[:, 0], v[:, 0], a[:, 1:], v[:, 1:]


def test_converted_model_computes_official_function():
    cfg = ModelConfig(**TINY)
    src = tiny()
    sd = {}
    g = torch.Generator().manual_seed(3)
    for k, val in src.state_dict().items():  # random official-style weights, every LayerNorm perturbed
        sd['module.' + k] = val + 0.05 * torch.randn(val.shape, generator=g) if 'pos_embed' not in k else val
    for k in list(sd):  # the unused LayerNorm pairs the official blocks carry
        m = re.match(r'module\.(blocks_a|blocks_v|decoder_blocks)\.(\d+)\.norm([12])\.(weight|bias)$', k)
        if m:
            for mod in ('a', 'v'):
                sd[k.replace(f'norm{m.group(3)}.', f'norm{m.group(3)}_{mod}.')] = torch.randn(sd[k].shape, generator=g)
    model = CAVMAESync(cfg).eval()
    model.load_state_dict(convert_official_state_dict(sd, cfg), strict=True)
    a, v = inputs(cfg)
    with torch.no_grad():
        ours = model.forward_features(a, v)
        ref = reference_official_features(sd, cfg, a, v)
    for x, y in zip(ours, ref):
        assert torch.allclose(x, y, atol=1e-5)
