"""
A compact re-implementation of the public CAV-MAE Sync model (its `CAVMAE` class) in the released style,
for equivalence tests and the speed comparison of tests/bench_release.py. Written from the description of
that code, not copied:
  - timm-0.4-style blocks with three LayerNorm pairs in EVERY block (only the joint blocks use *_a/*_v),
    explicit softmax attention (no SDPA), nn.LayerNorm default eps 1e-5;
  - forward_encoder: MAE random masking (noise argsort, ids_restore, len_keep = int(N * (1 - ratio))),
    then ALWAYS all three joint passes (fused + norm, audio + norm_a, visual + norm_v);
  - forward_decoder: mask tokens appended and unshuffled with gather(ids_restore);
  - forward: decoder + MAE loss only when mae_loss_weight != 0, contrastive loss on the cls tokens.
Parameter names and order follow the official state dict (reference/official_state_dict_keys.tsv); the fixed
positional embeddings are frozen Parameters as released. Built from a model.ModelConfig.
Extras for tests: optional masking noise, caller-given visible indices (the release's TG-DP calls a
missing `ranked_masking`), and the teacher pass with attention-to-cls priorities.
ReleaseCAVMAEFT restates the releases' probing model (CAVMAEFT) on the same encoder weights.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import sincos_pos_embed_2d


class Attention(nn.Module):  # timm 0.4: explicit attention matrix
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.save_attn = False  # teacher only: keep the last attention map (B, H, N, N)
        self.last_attn = None

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)  # (B, H, N, N)
        if self.save_attn:
            self.last_attn = attn
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Every released block carries norm1/norm1_a/norm1_v and norm2/norm2_a/norm2_v."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2, self.norm2_a, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, modality=None):
        if modality is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if modality == 'a':
            x = x + self.attn(self.norm1_a(x))
            return x + self.mlp(self.norm2_a(x))
        x = x + self.attn(self.norm1_v(x))
        return x + self.mlp(self.norm2_v(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ReleaseCAVMAE(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.config = c
        p, D, Dd, R = c.patch_size, c.embed_dim, c.decoder_embed_dim, c.num_registers
        self.grid_a, self.grid_v = (c.num_mel_bins // p, c.audio_length // p), (c.img_size // p, c.img_size // p)
        self.num_patches_a, self.num_patches_v = self.grid_a[0] * self.grid_a[1], self.grid_v[0] ** 2
        self.num_registers = R
        # registration order = the official state dict's key order
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed_a = nn.Parameter(sincos_pos_embed_2d(D, *self.grid_a)[None], requires_grad=False)
        self.pos_embed_v = nn.Parameter(sincos_pos_embed_2d(D, *self.grid_v)[None], requires_grad=False)
        self.register_tokens = nn.Parameter(torch.zeros(2 * R, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_a = nn.Parameter(sincos_pos_embed_2d(Dd, *self.grid_a)[None], requires_grad=False)
        self.decoder_pos_embed_v = nn.Parameter(sincos_pos_embed_2d(Dd, *self.grid_v)[None], requires_grad=False)
        self.cls_token_a = nn.Parameter(torch.zeros(1, 1, D))
        self.cls_token_v = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embed_a = PatchEmbed(1, D, p)
        self.patch_embed_v = PatchEmbed(3, D, p)
        self.blocks_a = nn.ModuleList([Block(D, c.num_heads, c.mlp_ratio) for _ in range(c.modality_depth)])
        self.blocks_v = nn.ModuleList([Block(D, c.num_heads, c.mlp_ratio) for _ in range(c.modality_depth)])
        self.blocks_u = nn.ModuleList([Block(D, c.num_heads, c.mlp_ratio) for _ in range(c.joint_depth)])
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.decoder_embed = nn.Linear(D, Dd)
        self.decoder_blocks = nn.ModuleList([Block(Dd, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred_a = nn.Linear(Dd, p * p)
        self.decoder_pred_v = nn.Linear(Dd, p * p * 3)
        for name, prm in self.named_parameters():
            if 'token' in name or 'modality' in name:
                nn.init.normal_(prm, std=0.02)

    # --- masking -------------------------------------------------------------------

    @staticmethod
    def random_masking(x, mask_ratio, noise=None, ids_keep=None):
        """MAE masking. x (B, N, D) -> (visible (B, k, D), mask (B, N) 1 = masked, ids_restore (B, N)).
        noise (B, N): the random draw; ids_keep (B, k): caller-chosen visible patches (guided masking)."""
        B, N, D = x.shape
        if ids_keep is None:
            noise = torch.rand(B, N, device=x.device) if noise is None else noise
            len_keep = int(N * (1 - mask_ratio))
            ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        else:  # visible first in the given order, then the rest in index order
            len_keep = ids_keep.shape[1]
            rest = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter(1, ids_keep, False)
            ids_shuffle = torch.cat([ids_keep, rest.nonzero()[:, 1].view(B, N - len_keep)], dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    # --- encoder / decoder -------------------------------------------------------------

    def embed(self, a, v):  # a (B, L, F), v (B, 3, H, W) -> (B, Na, D), (B, Nv, D)
        a = self.patch_embed_a(a.unsqueeze(1).transpose(2, 3))  # (B, 1, F, L)
        a = a + self.pos_embed_a + self.modality_a
        v = self.patch_embed_v(v)
        v = v + self.pos_embed_v + self.modality_v
        return a, v

    def modality_encoders(self, a, v):  # prepend cls, append registers, modality blocks, drop registers
        B, R = a.shape[0], self.num_registers
        a = torch.cat([self.cls_token_a.expand(B, -1, -1), a, self.register_tokens[:R].expand(B, -1, -1)], dim=1)
        v = torch.cat([self.cls_token_v.expand(B, -1, -1), v, self.register_tokens[R:].expand(B, -1, -1)], dim=1)
        for blk in self.blocks_a:
            a = blk(a)
        for blk in self.blocks_v:
            v = blk(v)
        return a[:, :a.shape[1] - R], v[:, :v.shape[1] - R]

    def forward_encoder(self, a, v, mask_ratio_a, mask_ratio_v, noise_a=None, noise_v=None, keep_a=None, keep_v=None):
        """-> x (B, ka + kv, D) fused after norm, mask_a, ids_restore_a, mask_v, ids_restore_v,
        ca (B, 1 + ka, D) after norm_a, cv (B, 1 + kv, D) after norm_v. All three joint passes, always."""
        a, v = self.embed(a, v)
        a, mask_a, ids_restore_a = self.random_masking(a, mask_ratio_a, noise_a, keep_a)
        v, mask_v, ids_restore_v = self.random_masking(v, mask_ratio_v, noise_v, keep_v)
        a, v = self.modality_encoders(a, v)
        x = torch.cat([a[:, 1:], v[:, 1:]], dim=1)
        for blk in self.blocks_u:
            x = blk(x)
        x = self.norm(x)
        ca, cv = a, v
        for blk in self.blocks_u:
            ca = blk(ca, 'a')
        ca = self.norm_a(ca)
        for blk in self.blocks_u:
            cv = blk(cv, 'v')
        cv = self.norm_v(cv)
        return x, mask_a, ids_restore_a, mask_v, ids_restore_v, ca, cv

    def forward_decoder(self, x, mask_a, ids_restore_a, mask_v, ids_restore_v):
        """x (B, ka + kv, D) -> pred_a (B, Na, p*p), pred_v (B, Nv, p*p*3)."""
        x = self.decoder_embed(x)  # (B, ka + kv, Dd)
        B, _, Dd = x.shape
        Na = self.num_patches_a
        ka = Na - int(mask_a[0].sum())
        a_ = torch.cat([x[:, :ka], self.mask_token.repeat(B, Na - ka, 1)], dim=1)
        a_ = torch.gather(a_, 1, ids_restore_a.unsqueeze(-1).repeat(1, 1, Dd))  # unshuffle
        v_ = torch.cat([x[:, ka:], self.mask_token.repeat(B, int(mask_v[0].sum()), 1)], dim=1)
        v_ = torch.gather(v_, 1, ids_restore_v.unsqueeze(-1).repeat(1, 1, Dd))
        x = torch.cat([a_, v_], dim=1)
        x = x + torch.cat([self.decoder_pos_embed_a, self.decoder_pos_embed_v], dim=1)
        x = torch.cat([x[:, :Na] + self.decoder_modality_a, x[:, Na:] + self.decoder_modality_v], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, :Na]), self.decoder_pred_v(x[:, Na:])

    # --- losses ----------------------------------------------------------------------

    def patchify(self, imgs, c, h, w):  # (B, c, h*p, w*p) -> (B, h*w, p*p*c), 'nchpwq->nhwpqc'
        p = self.config.patch_size
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(imgs.shape[0], h * w, p * p * c)

    def forward_mae_loss(self, inp, pred, mask, modality):
        if modality == 'a':
            target = self.patchify(inp.unsqueeze(1).transpose(2, 3), 1, *self.grid_a)
        else:
            target = self.patchify(inp, 3, *self.grid_v)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
        return (loss * mask).sum() / mask.sum()

    @staticmethod
    def forward_contrastive(audio_rep, video_rep, tau=0.05):  # bidirectional InfoNCE, log_softmax over both axes
        audio_rep, video_rep = F.normalize(audio_rep, dim=-1), F.normalize(video_rep, dim=-1)
        total = audio_rep @ video_rep.T / tau  # (B, B)
        nce_1 = -torch.mean(torch.diag(F.log_softmax(total, dim=0)))
        nce_2 = -torch.mean(torch.diag(F.log_softmax(total, dim=1)))
        acc = (torch.argmax(F.softmax(total, dim=0), dim=0) == torch.arange(total.shape[0])).float().mean()
        return (nce_1 + nce_2) / 2, acc

    def forward(self, a, v, mask_ratio_a=0.75, mask_ratio_v=0.75, mae_loss_weight=1.0, contrast_loss_weight=0.01,
                noise_a=None, noise_v=None, keep_a=None, keep_v=None):
        """The release's training forward. The decoder runs only when mae_loss_weight != 0; the encoder always
        runs its three joint passes. Returns a dict (loss, loss_mae, loss_mae_a, loss_mae_v, loss_c, c_acc,
        pred_a, pred_v, mask_a, mask_v, g_a, g_v)."""
        x, mask_a, ids_a, mask_v, ids_v, ca, cv = self.forward_encoder(a, v, mask_ratio_a, mask_ratio_v, noise_a, noise_v, keep_a, keep_v)
        out = dict(mask_a=mask_a, mask_v=mask_v, g_a=ca[:, 0], g_v=cv[:, 0])
        zero = x.new_zeros(())
        if mae_loss_weight != 0:
            out['pred_a'], out['pred_v'] = self.forward_decoder(x, mask_a, ids_a, mask_v, ids_v)
            out['loss_mae_a'] = self.forward_mae_loss(a, out['pred_a'], mask_a, 'a')
            out['loss_mae_v'] = self.forward_mae_loss(v, out['pred_v'], mask_v, 'v')
            out['loss_mae'] = mae_loss_weight * (out['loss_mae_a'] + out['loss_mae_v'])
        else:
            out['loss_mae'] = out['loss_mae_a'] = out['loss_mae_v'] = zero
        if contrast_loss_weight != 0:
            out['loss_c'], out['c_acc'] = self.forward_contrastive(ca[:, 0], cv[:, 0])
            out['loss_c'] = contrast_loss_weight * out['loss_c']
        else:
            out['loss_c'], out['c_acc'] = zero, zero
        out['loss'] = out['loss_mae'] + out['loss_c']
        return out

    # --- inference / teacher -------------------------------------------------------------

    def forward_feat(self, a, v):
        """Unmasked: (B, 1 + Na, D) after norm_a, (B, 1 + Nv, D) after norm_v, cls token first."""
        a, v = self.modality_encoders(*self.embed(a, v))
        for blk in self.blocks_u:
            a = blk(a, 'a')
        for blk in self.blocks_u:
            v = blk(v, 'v')
        return self.norm_a(a), self.norm_v(v)

    @torch.no_grad()
    def forward_teacher(self, a, v):
        """TG-DP teacher, unshuffled: forward_feat keeping the last joint block's attention of each pass.
        -> g_a, g_v (B, D), priority_a (B, Na), priority_v (B, Nv): head-mean attention of patch queries to
        the cls key, normalised over patches."""
        attn_mod = self.blocks_u[-1].attn
        attn_mod.save_attn = True
        try:
            a, v = self.modality_encoders(*self.embed(a, v))
            priorities = []
            for x, m in ((a, 'a'), (v, 'v')):
                for blk in self.blocks_u:
                    x = blk(x, m)
                p = attn_mod.last_attn[:, :, 1:, 0].mean(dim=1)  # (B, N)
                priorities.append(p / p.sum(dim=1, keepdim=True))
                if m == 'a':
                    a = self.norm_a(x)
                else:
                    v = self.norm_v(x)
        finally:
            attn_mod.save_attn, attn_mod.last_attn = False, None
        return a[:, 0], v[:, 0], priorities[0], priorities[1]


def release_state_dict_from_ours(sd, generator=None):
    """Our CAVMAESync state dict -> the released layout: add the *_a / *_v LayerNorm pairs that every
    non-joint released block carries (random values when a generator is given: they must not matter)."""
    out = dict(sd)
    for key, val in sd.items():
        parts = key.split('.')
        if parts[0] in ('blocks_a', 'blocks_v', 'decoder_blocks') and parts[2] in ('norm1', 'norm2'):
            for m in ('a', 'v'):
                new = f'{parts[0]}.{parts[1]}.{parts[2]}_{m}.{parts[3]}'
                out[new] = torch.randn(val.shape, generator=generator) if generator is not None else val.clone()
    return out


class ReleaseCAVMAEFT(nn.Module):
    """The releases' probing model (CAVMAEFT in cavmae_dp.py / cav_mae_sync.py, mode 'multimodal',
    aggregate='self_attention_cls', keep_register_tokens=False), restated around a ReleaseCAVMAE's
    encoder weights. Every frame (batch rows are clips x total_frame frames, clip-major):
      - patch embedding + positions + modality; the cls token prepended when cls_token=True (a model
        built without it has none), the registers appended; the 11-block modality encoders; the
        registers removed;
      - the joint layer on [audio tokens ; visual tokens] with the unified LayerNorms and `norm`:
        computed, then not used;
      - the frame's vector: [cls_a ; cls_v] of the modality encoders' outputs (cls_token=True), else
        [mean of the audio tokens ; mean of the visual tokens]: no LayerNorm either way.
    Then per clip: a learned cls token before the total_frame vectors, 2 released Blocks of width 2D,
    classifier_norm, classifier_head on the cls row."""

    def __init__(self, encoder, label_dim, total_frame, cls_token=True):
        super().__init__()
        c = encoder.config
        self.encoder, self.total_frame, self.cls_token = encoder, total_frame, cls_token
        dim = 2 * c.embed_dim
        self.cls_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.classifier_layers = nn.ModuleList([Block(dim, c.num_heads, c.mlp_ratio) for _ in range(2)])
        self.classifier_norm = nn.LayerNorm(dim)
        self.classifier_head = nn.Linear(dim, label_dim)

    def encoder_outputs(self, a, v):
        """-> audio, visual outputs of the modality encoders, registers still appended (B, ..., D)."""
        enc = self.encoder
        a, v = enc.embed(a, v)
        B, R = a.shape[0], enc.num_registers
        if self.cls_token:
            a = torch.cat([enc.cls_token_a.expand(B, -1, -1), a], dim=1)
            v = torch.cat([enc.cls_token_v.expand(B, -1, -1), v], dim=1)
        a = torch.cat([a, enc.register_tokens[:R].expand(B, -1, -1)], dim=1)
        v = torch.cat([v, enc.register_tokens[R:].expand(B, -1, -1)], dim=1)
        for blk in enc.blocks_a:
            a = blk(a)
        for blk in enc.blocks_v:
            v = blk(v)
        return a, v

    def frame_features(self, a, v):  # (B*T, L, F), (B*T, 3, H, W) -> (B*T, 2D)
        enc, R = self.encoder, self.encoder.num_registers
        a, v = self.encoder_outputs(a, v)
        a, v = a[:, :a.shape[1] - R], v[:, :v.shape[1] - R]  # registers removed
        x = torch.cat([a, v], dim=1)
        for blk in enc.blocks_u:
            x = blk(x)
        x = enc.norm(x)  # the joint output: not used below
        if self.cls_token:
            return torch.cat([a[:, 0], v[:, 0]], dim=1)
        return torch.cat([a.mean(dim=1), v.mean(dim=1)], dim=1)

    def forward(self, a, v):  # -> logits (B, label_dim)
        x = self.frame_features(a, v)
        x = x.view(x.shape[0] // self.total_frame, self.total_frame, x.shape[-1])
        x = torch.cat([self.cls_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.classifier_layers:
            x = blk(x)
        return self.classifier_head(self.classifier_norm(x)[:, 0])
