"""
Our CAVMAESync computes the released CAV-MAE Sync / TG-DP functions (tests/release_model.py), pass by pass,
with the same weights and the same masks: reconstruction, global tokens, guided contrastive view, teacher
priorities, gradients of a whole TG-DP loss, and the releases' probing model (CAVMAEFT) on evaluate.py's
probe inputs.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import evaluate
import masking
from losses import distill_loss, info_nce
from model import CAVMAESync, ModelConfig, convert_official_state_dict, load_weights
from release_model import ReleaseCAVMAE, ReleaseCAVMAEFT, release_state_dict_from_ours

TINY = dict(audio_length=64, num_mel_bins=32, img_size=32, patch_size=8, embed_dim=48, num_heads=4,
            modality_depth=2, joint_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
            num_registers=2)
ATOL = 1e-5


def perturbed_release(cfg, seed=0):
    """Released-style model with random weights, every LayerNorm (used or not) and token away from init."""
    torch.manual_seed(seed)
    rel = ReleaseCAVMAE(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for prm in rel.parameters():
            if prm.requires_grad and prm.ndim == 1:  # LayerNorm and linear biases
                prm.add_(0.1 * torch.randn(prm.shape, generator=g))
    return rel


@pytest.fixture(scope='module')
def pair():
    """(ours, release) with the same function: random released weights -> convert_official_state_dict -> ours."""
    cfg = ModelConfig(**TINY)
    rel = perturbed_release(cfg)
    ours = CAVMAESync(cfg).eval()
    ours.load_state_dict(convert_official_state_dict({'module.' + k: v for k, v in rel.state_dict().items()}, cfg))
    return ours, rel


def inputs(cfg, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, cfg.audio_length, cfg.num_mel_bins, generator=g)
    v = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
    return a, v, torch.rand(B, 32, generator=g), torch.rand(B, 16, generator=g)  # audio, image, noise_a, noise_v


def views(m, noise_a, noise_v, ratio=0.75):  # the random reconstruction view of the given noise, as train.py
    return (masking.random_masking(noise_a.shape[0], m.num_patches_a, ratio, noise=noise_a)[0],
            masking.random_masking(noise_v.shape[0], m.num_patches_v, ratio, noise=noise_v)[0])


def close(x, y, atol=ATOL):
    return x.shape == y.shape and torch.allclose(x, y, atol=atol, rtol=1e-4)


# --- layout ------------------------------------------------------------------------------

def test_release_layout_matches_official_keys(shared_dir):
    with torch.device('meta'):
        rel = ReleaseCAVMAE(ModelConfig())
    got = [(k, tuple(v.shape)) for k, v in rel.state_dict().items()]
    lines = open(os.path.join(shared_dir, 'reference', 'official_state_dict_keys.tsv')).read().splitlines()
    want = [(k, eval(s)) for k, s in (line.split('\t') for line in lines)]
    assert got == want  # names, shapes and order
    assert sum(math.prod(s) for _, s in got) == 190_660_864
    frozen = sorted(k for k, p in rel.named_parameters() if not p.requires_grad)
    assert frozen == ['decoder_pos_embed_a', 'decoder_pos_embed_v', 'pos_embed_a', 'pos_embed_v']


def test_masks_agree_where_int_and_round_agree():
    # ours keeps round(N * (1 - r)), the release int(N * (1 - r)): equal at the settings used here
    for N, r in [(32, 0.75), (16, 0.75), (32, 0.5), (16, 0.5), (208, 0.75), (196, 0.75), (208, 0.5), (196, 0.5)]:
        assert masking.num_keep(N, r) == int(N * (1 - r))
    assert masking.num_keep(196, 0.65) != int(196 * (1 - 0.65))  # 69 vs 68: here the two differ


# --- the passes -----------------------------------------------------------------------------

def test_reconstruction_equals_release_encoder_decoder_loss(pair):
    ours, rel = pair
    a, v, na, nv = inputs(ours.config)
    with torch.no_grad():
        o = ours(a, v, *views(ours, na, nv))
        r = rel(a, v, 0.75, 0.75, mae_loss_weight=1.0, contrast_loss_weight=0.0, noise_a=na, noise_v=nv)
    assert torch.equal(o['mask_a'], r['mask_a']) and torch.equal(o['mask_v'], r['mask_v'])
    assert o['mask_a'].sum(1).tolist() == [24] * 4 and o['mask_v'].sum(1).tolist() == [12] * 4
    assert close(o['pred_a'], r['pred_a']) and close(o['pred_v'], r['pred_v'])
    assert close(o['loss_a'], r['loss_mae_a']) and close(o['loss_v'], r['loss_mae_v']) and close(o['loss'], r['loss_mae'])


def test_reconstruction_with_norm_pix_targets():
    cfg = ModelConfig(**TINY, norm_pix_loss=True)
    rel = perturbed_release(cfg, seed=4)
    ours = CAVMAESync(cfg).eval()
    ours.load_state_dict(convert_official_state_dict(rel.state_dict(), cfg))
    a, v, na, nv = inputs(cfg, seed=2)
    with torch.no_grad():
        o = ours(a, v, *views(ours, na, nv))
        r = rel(a, v, mae_loss_weight=1.0, contrast_loss_weight=0.0, noise_a=na, noise_v=nv)
    assert close(o['loss_a'], r['loss_mae_a']) and close(o['loss_v'], r['loss_mae_v'])


def test_sync_globals_equal_release_cls_after_norm(pair):
    ours, rel = pair
    a, v, na, nv = inputs(ours.config)
    with torch.no_grad():
        o = ours(a, v, *views(ours, na, nv))  # one view: CAV-MAE Sync's single pass
        r = rel(a, v, 0.75, 0.75, mae_loss_weight=1.0, contrast_loss_weight=0.1, noise_a=na, noise_v=nv)
    assert close(o['g_a'], r['g_a']) and close(o['g_v'], r['g_v']) and close(o['loss'], r['loss_mae'])
    loss_c, _ = info_nce(o['g_a'], o['g_v'], 0.05)
    assert close(0.1 * loss_c, r['loss_c'])  # our InfoNCE = the release's log_softmax over both axes


def test_guided_contrastive_equals_release_with_given_indices(pair):
    ours, rel = pair
    a, v, na, nv = inputs(ours.config, seed=3)
    _, _, attn_a, attn_v = ours.forward_teacher(a, v)  # as train.py chooses the guided view:
    keep_a = masking.contrastive_keep('guided', attn_a, 0.5)  # (4, 16)
    keep_v = masking.contrastive_keep('guided', attn_v, 0.5)  # (4, 8)
    with torch.no_grad():  # the second view of the two-view forward
        out = ours(a, v, *views(ours, na, nv), keep_a, keep_v)
        g_a, g_v = out['g_a'], out['g_v']
        r = rel(a, v, mae_loss_weight=0.0, contrast_loss_weight=1.0, keep_a=keep_a, keep_v=keep_v)
    assert 'pred_a' not in r  # the release skips its decoder only when the MAE weight is 0
    assert close(g_a, r['g_a']) and close(g_v, r['g_v'])
    kept = 1 - r['mask_a']  # the release's mask marks exactly the given patches visible
    assert torch.equal(kept.nonzero()[:, 1].view(4, -1), keep_a.sort(1).values)


def test_teacher_equals_release_explicit_attention(pair):
    ours, rel = pair
    a, v, _, _ = inputs(ours.config, seed=5)
    t_a, t_v, attn_a, attn_v = ours.forward_teacher(a, v)  # raw attention, normalised by masking
    p_a, p_v = masking.teacher_priority(attn_a), masking.teacher_priority(attn_v)
    r_a, r_v, q_a, q_v = rel.forward_teacher(a, v)
    assert close(t_a, r_a) and close(t_v, r_v)
    assert close(p_a, q_a, 1e-6) and close(p_v, q_v, 1e-6)
    # our guided view is the top-k of the release's priorities up to float tolerance (two patches whose priorities
    # tie within rounding may swap places at the k-th rank, so compare the priorities kept, not the indices)
    for p, q in ((p_a, q_a), (p_v, q_v)):
        kept = q.gather(1, masking.guided_keep(p, 0.5)).sort(1).values
        top = q.topk(masking.num_keep(q.shape[1], 0.5), dim=1).values.sort(1).values
        torch.testing.assert_close(kept, top, rtol=0, atol=1e-6)
    # and the teacher's globals are the unmasked inference (forward_feat's cls rows)
    with torch.no_grad():
        fa, fv = rel.forward_feat(a, v)
        ga, gv, tok_a, tok_v = ours.forward_features(a, v)
    assert close(fa[:, 0], t_a) and close(tok_a, fa[:, 1:]) and close(tok_v, fv[:, 1:]) and close(gv, fv[:, 0])


def test_layernorm_eps_is_the_releases(pair):
    # eps 1e-6 (MAE's) instead of 1e-5 changes outputs by ~1e-6 at these activation scales: below the
    # numeric tolerance above, so check it directly
    ours, rel = pair
    eps = lambda m: {mod.eps for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert eps(ours) == eps(rel) == {1e-5}


def test_unused_layernorms_do_not_matter(pair):
    ours, rel = pair
    sd = release_state_dict_from_ours(ours.state_dict(), torch.Generator().manual_seed(9))  # random unused pairs
    other = ReleaseCAVMAE(ours.config).eval()
    assert other.load_state_dict(sd, strict=True)
    a, v, na, nv = inputs(ours.config)
    with torch.no_grad():
        r1 = rel(a, v, noise_a=na, noise_v=nv, contrast_loss_weight=1.0)
        r2 = other(a, v, noise_a=na, noise_v=nv, contrast_loss_weight=1.0)
    assert not torch.allclose(other.blocks_a[0].norm1_a.weight, rel.blocks_a[0].norm1_a.weight)
    for k in ('pred_a', 'pred_v', 'g_a', 'g_v', 'loss'):
        assert close(r1[k], r2[k], 1e-6)


# --- a whole TG-DP loss, gradients -------------------------------------------------------------

def test_tgdp_loss_gradients_agree(pair):
    ours, rel = pair
    ours, rel = ours.train(), rel.train()  # no dropout anywhere: train() changes nothing numerically
    a, v, na, nv = inputs(ours.config, seed=7)
    t_a, t_v, attn_a, attn_v = ours.forward_teacher(a, v)
    keep_a = masking.contrastive_keep('guided', attn_a, 0.5)
    keep_v = masking.contrastive_keep('guided', attn_v, 0.5)

    out = ours(a, v, *views(ours, na, nv), keep_a, keep_v)
    loss_ours = out['loss'] + 0.1 * info_nce(out['g_a'], out['g_v'])[0] + distill_loss(out['g_a'], out['g_v'], t_a, t_v)
    rec = rel(a, v, 0.75, 0.75, mae_loss_weight=1.0, contrast_loss_weight=0.0, noise_a=na, noise_v=nv)
    con = rel(a, v, mae_loss_weight=0.0, contrast_loss_weight=0.1, keep_a=keep_a, keep_v=keep_v)
    loss_rel = rec['loss'] + con['loss'] + F.mse_loss(con['g_a'], t_a) + F.mse_loss(con['g_v'], t_v)
    assert close(loss_ours, loss_rel)

    ours.zero_grad(set_to_none=True)
    rel.zero_grad(set_to_none=True)
    loss_ours.backward()
    loss_rel.backward()
    grads_rel = {k: p.grad for k, p in rel.named_parameters()}
    names = ['cls_token_a', 'register_tokens', 'modality_v', 'mask_token', 'patch_embed_a.proj.weight',
             'blocks_a.0.attn.qkv.weight', 'blocks_v.1.mlp.fc2.weight', 'blocks_u.0.norm1.weight',
             'blocks_u.0.norm1_a.weight', 'blocks_u.0.norm2_v.bias', 'blocks_u.0.attn.proj.weight',
             'norm.bias', 'norm_a.weight', 'decoder_blocks.0.attn.qkv.weight', 'decoder_pred_v.weight']
    for name, p in ours.named_parameters():
        g = grads_rel[name]
        assert (p.grad is None) == (g is None), name
        if p.grad is not None:
            assert close(p.grad, g), (name, (p.grad - g).abs().max().item())
    for name in names:  # every one of them got a real gradient
        assert dict(ours.named_parameters())[name].grad.abs().sum() > 0, name
    # the unused LayerNorm pairs of the released blocks never see a gradient
    assert rel.blocks_a[0].norm1_v.weight.grad is None and rel.decoder_blocks[0].norm2_a.bias.grad is None
    ours.zero_grad(set_to_none=True)
    rel.zero_grad(set_to_none=True)
    ours.eval()
    rel.eval()


# --- the releases' probing model (CAVMAEFT) -----------------------------------------------------

def probe_from_release(ft, num_heads):
    """evaluate.AttentionProbe holding the release classifier's weights (its Blocks' qkv / proj / mlp
    become nn.TransformerEncoderLayer's in_proj / out_proj / linear1 / linear2)."""
    dim, num_classes = ft.classifier_head.in_features, ft.classifier_head.out_features
    probe = evaluate.AttentionProbe(dim, num_classes, num_heads)
    sd = {'cls_token': ft.cls_cls_token, 'norm.weight': ft.classifier_norm.weight,
          'norm.bias': ft.classifier_norm.bias, 'head.weight': ft.classifier_head.weight,
          'head.bias': ft.classifier_head.bias}
    names = {'self_attn.in_proj_': 'attn.qkv.', 'self_attn.out_proj.': 'attn.proj.', 'linear1.': 'mlp.fc1.',
             'linear2.': 'mlp.fc2.', 'norm1.': 'norm1.', 'norm2.': 'norm2.'}
    released = ft.state_dict()
    for i in range(len(ft.classifier_layers)):
        for ours, theirs in names.items():
            for p in ('weight', 'bias'):
                sd[f'blocks.{i}.{ours}{p}'] = released[f'classifier_layers.{i}.{theirs}{p}']
    probe.load_state_dict(sd)
    return probe.eval()


@pytest.mark.parametrize('probe_input', ['global', 'patch'])
def test_probe_equals_release_cavmaeft(probe_input):
    """evaluate's default probe input ('global': the modality encoders' global-token outputs, before the
    joint layer, no LayerNorm) + AttentionProbe = the releases' CAVMAEFT with cls_token=True; 'patch'
    (their mean patch outputs) = CAVMAEFT with cls_token=False on a model without global tokens. Random
    official-layout weights, converted by model.load_weights; random classifier weights, copied."""
    global_token, T, B, C = probe_input == 'global', 4, 3, 5
    cfg = ModelConfig(**TINY, global_token=global_token)
    rel = perturbed_release(ModelConfig(**TINY), seed=11)
    ft = ReleaseCAVMAEFT(rel, C, T, cls_token=global_token).eval()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, prm in ft.named_parameters():
            if not name.startswith('encoder.'):
                prm.copy_(prm + 0.5 * torch.randn(prm.shape, generator=g))
    sd = {'module.' + k: v for k, v in rel.state_dict().items() if global_token or 'cls_token' not in k}
    ours = CAVMAESync(cfg).eval()
    load_weights(ours, sd, verbose=False)
    a, v, _, _ = inputs(cfg, B=B * T, seed=13)  # B clips x T frames, clip-major
    with torch.no_grad():
        fa, fv = evaluate.frame_vectors(ours, a, v, probe_input)  # (B*T, D) each
        assert close(torch.cat([fa, fv], dim=1), ft.frame_features(a, v))
        x = evaluate.probe_inputs(dict(g_a=fa.view(B, T, -1), g_v=fv.view(B, T, -1)))  # (B, T, 2D)
        assert close(probe_from_release(ft, cfg.num_heads)(x), ft(a, v))
        if global_token:  # the retrieval embedding (after the joint layer and norm_a) is another vector
            ja, _ = evaluate.frame_vectors(ours, a, v, 'joint')
            assert not close(ja, fa, atol=1e-2)


def test_patch_and_register_probe_inputs_of_a_model_with_global_tokens(pair):
    """'patch' / 'register': the mean of the encoders' patch / register outputs, the global token left out
    (Table 12 of the CAV-MAE Sync supplement probes global, register and patch tokens; the releases'
    CAVMAEFT never feeds its registers to the classifier)."""
    ours, rel = pair
    a, v, _, _ = inputs(ours.config, seed=14)
    R = ours.config.num_registers
    with torch.no_grad():
        ra, rv = ReleaseCAVMAEFT(rel, 5, 4).encoder_outputs(a, v)  # (B, 1 + N + R, D): cls first
        pa, pv = evaluate.frame_vectors(ours, a, v, 'patch')
        qa, qv = evaluate.frame_vectors(ours, a, v, 'register')
    assert close(pa, ra[:, 1:-R].mean(dim=1)) and close(pv, rv[:, 1:-R].mean(dim=1))
    assert close(qa, ra[:, -R:].mean(dim=1)) and close(qv, rv[:, -R:].mean(dim=1))
    with pytest.raises(ValueError, match='num_registers=0'):
        evaluate.frame_vectors(CAVMAESync(ModelConfig(**{**TINY, 'num_registers': 0})), a, v, 'register')
    with pytest.raises(ValueError, match='global_token=False'):
        evaluate.frame_vectors(CAVMAESync(ModelConfig(**TINY, global_token=False)), a, v, 'global')
