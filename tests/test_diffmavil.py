"""
DiffMAViL's decoder options (the DiffMAViL paper): diffused mask tokens and the cross-attention decoder,
each checked against an independent reference; plus their analytic FLOPs.
"""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import masking
from model import CAVMAESync, CrossBlock, ModelConfig, convert_official_state_dict, diffusion_alpha_bar, forward_flops
from test_model import TINY, contrastive_embeddings, inputs, views


def tiny(**kw):
    torch.manual_seed(0)
    return CAVMAESync(ModelConfig(**{**TINY, **kw})).eval()


def alpha_bar_reference(t):  # closed form in float64, plain Python: prod_{s<=t} (1 - beta_s)
    betas = [(1e-4 + (0.02 - 1e-4) * (s - 1) / 999) ** 0.8 for s in range(1, t + 1)]
    return math.prod(1.0 - b for b in betas)


def fixed_noise(m, B=3, seed=2):  # masking noise (B, Na), (B, Nv): masks that draw nothing from torch's RNG
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, m.num_patches_a, generator=g), torch.rand(B, m.num_patches_v, generator=g)


# --- noise schedule ---------------------------------------------------------------------

def test_alpha_bar_matches_closed_form_and_decays():
    abar = diffusion_alpha_bar()
    assert abar.shape == (1000,)
    for t in (1, 500, 1000):
        assert math.isclose(abar[t - 1].item(), alpha_bar_reference(t), rel_tol=1e-5)
    assert (abar[1:] < abar[:-1]).all() and abar[0] > 0.999 and abar[-1] < 1e-6
    # x_t of x0 ~ N(0, 9): variance 9 abar + (1 - abar), moving from the data's 9 to the noise's 1
    m = tiny(diffused_mask_tokens=True)
    x0 = 3 * torch.randn(4, 4096, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 200, 500, 1000])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    xt = m.diffuse(x0, t, eps)
    for i in range(4):
        a = alpha_bar_reference(t[i].item())
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-5)
        assert abs(xt[i].var().item() / (9 * a + 1 - a) - 1) < 0.03


# --- config and state dict ----------------------------------------------------------------

def test_config_validates_decoder_attention():
    with pytest.raises(ValueError, match="decoder_attention must be 'self' or 'cross'"):
        ModelConfig(decoder_attention='Cross')


def test_default_state_dict_is_the_official_layout(shared_dir):
    official = {}
    for line in open(os.path.join(shared_dir, 'reference', 'official_state_dict_keys.tsv')):
        key, shape = line.rstrip('\n').split('\t')
        official['module.' + key] = torch.empty(*eval(shape), device='meta')
    with torch.device('meta'):
        default = CAVMAESync(ModelConfig()).state_dict()
        diffused = CAVMAESync(ModelConfig(diffused_mask_tokens=True)).state_dict()
    unused = re.compile(r'(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.')
    assert set(default) == {k[7:] for k in official if not unused.match(k[7:])}
    assert convert_official_state_dict(official).keys() == default.keys()
    # the option adds exactly its two projections (the schedule is a non-persistent buffer) and drops the
    # mask token it replaces (a parameter without gradient stops DDP)
    assert set(diffused) - set(default) == {f'decoder_noise_embed_{m}.{w}' for m in 'av' for w in ('weight', 'bias')}
    assert set(default) - set(diffused) == {'mask_token'}
    with pytest.raises(KeyError, match="'module.mask_token' has no place"):
        convert_official_state_dict(official, ModelConfig(diffused_mask_tokens=True))


# --- diffused mask tokens -------------------------------------------------------------------

def capture_decoder_input(m):
    seen = []
    m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    return seen


def test_diffused_tokens_fill_masked_positions_only():
    m = tiny(diffused_mask_tokens=True)
    ref = tiny()  # the default decoder with the same shared weights
    ref.load_state_dict(m.state_dict(), strict=False)
    a, v = inputs(m.config)
    noise_a, noise_v = fixed_noise(m)
    got, want = capture_decoder_input(m), capture_decoder_input(ref)
    torch.manual_seed(7)
    with torch.no_grad():
        out = m(a, v, *views(m, noise_a=noise_a, noise_v=noise_v))
        base = ref(a, v, *views(ref, noise_a=noise_a, noise_v=noise_v))
    # redraw the model's randomness in its order (t per clip, then eps for audio, then visual); the schedule independently
    torch.manual_seed(7)
    t = torch.randint(1, 1001, (3,))
    sqrt_abar = torch.tensor([math.sqrt(alpha_bar_reference(s)) for s in t.tolist()]).view(3, 1, 1)
    x_t = []
    for patches in (m.patchify_audio(a), m.patchify_image(v)):
        eps = torch.randn(patches.shape)
        x_t.append((sqrt_abar * patches.double() + (1 - sqrt_abar ** 2).sqrt() * eps.double()).float())
    tokens_a = F.linear(x_t[0], m.decoder_noise_embed_a.weight, m.decoder_noise_embed_a.bias) + m.decoder_pos_embed_a + m.decoder_modality_a
    tokens_v = F.linear(x_t[1], m.decoder_noise_embed_v.weight, m.decoder_noise_embed_v.bias) + m.decoder_pos_embed_v + m.decoder_modality_v
    expected = torch.cat([tokens_a, tokens_v], dim=1).detach()  # (B, Na + Nv, Dd)
    masked = torch.cat([out['mask_a'], out['mask_v']], dim=1).bool()  # (B, Na + Nv)
    assert torch.allclose(got[0][masked], expected[masked], atol=1e-5)
    assert torch.equal(got[0][~masked], want[0][~masked])  # visible latents as in the default decoder
    assert not torch.allclose(got[0][masked], want[0][masked])  # and no mask token
    assert torch.equal(out['mask_a'], base['mask_a']) and out['pred_a'].shape == base['pred_a'].shape


def test_diffused_tokens_need_the_patches():
    m = tiny(diffused_mask_tokens=True)
    a, v = inputs(m.config)
    keep_a = masking.random_masking(3, m.num_patches_a, 0.75)[0]
    keep_v = masking.random_masking(3, m.num_patches_v, 0.75)[0]
    enc_a = m.encode(masking.gather(m.embed_audio(a), keep_a), 'a')
    enc_v = m.encode(masking.gather(m.embed_image(v), keep_v), 'v')
    with pytest.raises(ValueError, match='patches_a and patches_v'):
        m.fused_decode(enc_a, enc_v, keep_a, keep_v)


# --- cross-attention decoder -------------------------------------------------------------------

def test_cross_block_matches_explicit_attention():
    torch.manual_seed(0)
    blk, H = CrossBlock(32, 4, 4.0), 4
    for p in blk.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.3)
    x, lat = torch.randn(2, 5, 32), torch.randn(2, 7, 32)

    def ln(z, norm):
        return F.layer_norm(z, (32,), norm.weight, norm.bias)
    q = F.linear(ln(x, blk.norm_q), blk.q.weight, blk.q.bias).view(2, 5, H, 8).transpose(1, 2)
    kv = F.linear(ln(lat, blk.norm_kv), blk.kv.weight, blk.kv.bias)
    k, v = (kv[..., :32].reshape(2, 7, H, 8).transpose(1, 2), kv[..., 32:].reshape(2, 7, H, 8).transpose(1, 2))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (2, H, 5, 7): queries see latents only
    h = x + F.linear((attn @ v).transpose(1, 2).reshape(2, 5, 32), blk.proj.weight, blk.proj.bias)
    ref = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(ln(h, blk.norm2))))
    with torch.no_grad():
        assert torch.allclose(blk(x, lat), ref, atol=1e-5)


def test_cross_decoder_shapes_and_zero_visible_predictions():
    a, v = inputs(ModelConfig(**TINY))
    torch.manual_seed(3)
    m = tiny()
    self_out = m(a, v, *views(m))
    for kw in (dict(decoder_attention='cross'), dict(decoder_attention='cross', diffused_mask_tokens=True)):
        m = tiny(**kw)
        assert all(isinstance(b, CrossBlock) for b in m.decoder_blocks)
        torch.manual_seed(3)
        out = m(a, v, *views(m))
        for mod in 'av':
            pred, mask = out['pred_' + mod], out['mask_' + mod]
            assert pred.shape == self_out['pred_' + mod].shape
            assert torch.equal(pred.abs().sum(-1) != 0, mask.bool())  # predicted exactly at the masked positions
        out['loss'].backward()
        assert m.decoder_blocks[0].kv.weight.grad.abs().sum() > 0


def decode(m, a, v, keep_a, keep_v, patches_a, patches_v, seed=11):
    torch.manual_seed(seed)  # same diffusion timesteps and noise on every call
    with torch.no_grad():
        enc_a = m.encode(masking.gather(m.embed_audio(a), keep_a), 'a')
        enc_v = m.encode(masking.gather(m.embed_image(v), keep_v), 'v')
        return m.fused_decode(enc_a, enc_v, keep_a, keep_v, patches_a, patches_v)


@pytest.mark.parametrize('attention', ['cross', 'self'])
def test_cross_queries_see_only_visible_latents(attention):
    m = tiny(decoder_attention=attention, diffused_mask_tokens=True)
    a, v = inputs(m.config)
    noise_a, noise_v = fixed_noise(m)
    keep_a, mask_a = masking.random_masking(3, m.num_patches_a, 0.75, noise=noise_a)
    keep_v, _ = masking.random_masking(3, m.num_patches_v, 0.75, noise=noise_v)
    pa, pv = m.patchify_audio(a), m.patchify_image(v)
    pred_a, pred_v = decode(m, a, v, keep_a, keep_v, pa, pv)
    masked = mask_a.bool()
    # the patches handed to the decoder at visible positions are overwritten by the latents: no effect
    vis_changed = pa + 5.0 * (1 - mask_a).unsqueeze(-1)
    assert torch.equal(decode(m, a, v, keep_a, keep_v, vis_changed, pv)[0], pred_a)
    # one masked query j changed (its diffused token): with cross attention only its own prediction moves
    j = masked[0].nonzero()[0, 0].item()
    one_changed = pa.clone()
    one_changed[0, j] += 5.0
    moved = (decode(m, a, v, keep_a, keep_v, one_changed, pv)[0] - pred_a).abs().amax(-1)  # (B, Na)
    others = masked.clone()
    others[0, j] = False
    assert moved[0, j] > 1e-3
    if attention == 'cross':
        assert moved[others].max() < 1e-6
    else:  # the self decoder's queries attend to each other: the check above can fail
        assert moved[others].max() > 1e-3
    # a visible input patch changed: the latents move, so do the masked predictions
    i = keep_a[0, 0].item()
    a2 = m.unpatchify_audio(pa.clone().index_fill_(1, torch.tensor([i]), 3.0))
    pred_a2, _ = decode(m, a2, v, keep_a, keep_v, m.patchify_audio(a2), pv)
    assert (pred_a2 - pred_a)[0].abs().amax(-1)[masked[0]].min() > 1e-5  # clip 0, where patch i is visible


# --- FLOPs ---------------------------------------------------------------------------------------

def explicit_sdpa(q, k, v):  # the math path, so that FlopCounterMode sees the attention matmuls
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize('kw', [{}, dict(decoder_attention='cross'), dict(diffused_mask_tokens=True),
                                dict(decoder_attention='cross', diffused_mask_tokens=True)])
def test_analytic_flops_match_flop_counter(monkeypatch, kw):
    monkeypatch.setattr(F, 'scaled_dot_product_attention', explicit_sdpa)
    m = tiny(**kw)
    a, v = inputs(m.config, B=1)
    for ratio in (0.75, 0.5):
        keep_a, keep_v = views(m, 1, ratio)
        with FlopCounterMode(display=False) as counter, torch.no_grad():  # the reconstruction pieces
            enc_a = m.encode(masking.gather(m.embed_audio(a), keep_a), 'a')
            enc_v = m.encode(masking.gather(m.embed_image(v), keep_v), 'v')
            m.fused_decode(enc_a, enc_v, keep_a, keep_v, m.patchify_audio(a), m.patchify_image(v))
        assert counter.get_total_flops() == sum(forward_flops(m.config, ratio, 'reconstruction').values())
        with FlopCounterMode(display=False) as counter, torch.no_grad():  # the whole single-view forward
            m(a, v, keep_a, keep_v)
        assert counter.get_total_flops() == sum(forward_flops(m.config, ratio, 'sync').values())


@pytest.mark.parametrize('joint_depth', [1, 2])
def test_analytic_flops_of_the_embedding_passes(monkeypatch, joint_depth):
    # the last joint block outputs the global token only in these passes; the count must follow
    monkeypatch.setattr(F, 'scaled_dot_product_attention', explicit_sdpa)
    m = tiny(joint_depth=joint_depth)
    a, v = inputs(m.config, B=1)
    keep_a = torch.arange(masking.num_keep(m.num_patches_a, 0.5))[None]  # (1, ka)
    keep_v = torch.arange(masking.num_keep(m.num_patches_v, 0.5))[None]
    rec_a, rec_v = views(m, 1, 0.75)
    passes = {'contrastive': (0.5, lambda: contrastive_embeddings(m, a, v, keep_a, keep_v)),
              'sync': (0.75, lambda: m(a, v, rec_a, rec_v)),
              'teacher': (0.0, lambda: m.forward_teacher(a, v)),
              'full': (0.0, lambda: m.forward_features(a, v))}
    for name, (ratio, run) in passes.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        assert counter.get_total_flops() == sum(forward_flops(m.config, ratio, name).values()), name
    # the two-view forward: both views' work, the patches embedded once
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(a, v, rec_a, rec_v, keep_a, keep_v)
    rec, con = forward_flops(m.config, 0.75, 'reconstruction'), forward_flops(m.config, 0.5, 'contrastive')
    assert counter.get_total_flops() == sum(rec.values()) + sum(con.values()) - con['patch_embed']


def test_paper_config_cross_decoder_flops():
    def total(c, ratio):
        return sum(forward_flops(c, ratio, 'reconstruction').values())
    self_, cross = ModelConfig(), ModelConfig(decoder_attention='cross')
    diffused = ModelConfig(decoder_attention='cross', diffused_mask_tokens=True)
    base = total(self_, 0.75)
    schedule = [masking.mask_ratio_schedule(i / 100, 0.9, 0.8) for i in range(101)]  # averaged over training
    ratios = {'cross @0.75': total(cross, 0.75) / base,
              'cross + diffused @0.75': total(diffused, 0.75) / base,
              'cross, curriculum 0.9->0.8': sum(total(cross, r) for r in schedule) / len(schedule) / base,
              'self, curriculum 0.9->0.8': sum(total(self_, r) for r in schedule) / len(schedule) / base,
              'decoder only, cross/self @0.75': forward_flops(cross, 0.75, 'reconstruction')['decoder']
              / forward_flops(self_, 0.75, 'reconstruction')['decoder']}
    print(f'\nreconstruction-pass forward FLOPs vs self decoder @0.75 ({base / 1e9:.1f} GFLOPs; paper: cross 0.81x, '
          'with curriculum 0.68x): ' + ', '.join(f'{k} {r:.3f}x' for k, r in ratios.items()))
    assert ratios['cross, curriculum 0.9->0.8'] < ratios['cross @0.75'] < 1.0
    assert ratios['cross @0.75'] < ratios['cross + diffused @0.75'] < 1.0


# --- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw', [dict(diffused_mask_tokens=True), dict(decoder_attention='cross'),
                                dict(decoder_attention='cross', diffused_mask_tokens=True)])
def test_tiny_model_trains(kw):
    m = tiny(**kw).train()
    a, v = inputs(m.config, B=4)
    keep_a, keep_v = views(m, 4, 0.75, *fixed_noise(m, B=4))

    def loss():
        return m(a, v, keep_a, keep_v)['loss']
    torch.manual_seed(0)
    with torch.no_grad():
        before = loss().item()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    torch.manual_seed(0)  # same diffusion draws as the first evaluation
    with torch.no_grad():
        after = loss().item()
    assert after < 0.9 * before, (before, after)
