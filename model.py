"""
The CAV-MAE Sync backbone with every pass TG-DP needs: two ViT encoders (audio, visual) with a
learned global token and register tokens, one shared joint layer run three ways (audio-only,
visual-only, fused) and a joint MAE decoder; parameter names as the official release's. Passes:
forward (a training step's student work), forward_teacher (full inputs -> global tokens and the
attention of each patch to them), forward_features (unmasked inference). DiffMAViL's decoder
options are off by default: diffused_mask_tokens, decoder_attention='cross'.
"""
import argparse
import collections
import contextlib
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import masking
from losses import mae_loss


@dataclass
class ModelConfig:
    audio_length: int = 416        # fbank frames per segment (4.16 s)
    num_mel_bins: int = 128
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    modality_depth: int = 11       # blocks per modality encoder
    joint_depth: int = 1           # shared joint blocks
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    num_registers: int = 8         # per modality
    global_token: bool = True      # False: CAV-MAE style, the mean-pooled patch tokens embed
    norm_pix_loss: bool = False    # per-patch normalised reconstruction targets
    diffused_mask_tokens: bool = False  # DiffMAViL: projected, DDPM-noised patches, no mask token
    decoder_attention: str = 'self'     # or 'cross': masked queries on visible latents (DiffMAViL)

    def __post_init__(self):
        p = self.patch_size
        for name in ('audio_length', 'num_mel_bins', 'img_size'):
            if getattr(self, name) % p:
                raise ValueError(f'ModelConfig.{name}={getattr(self, name)} is not a multiple of patch_size={p}')
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError('embed dims must be divisible by their numbers of heads')
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ValueError('embed dims must be multiples of 4 (2-D sin-cos positions)')
        if self.joint_depth < 1:
            raise ValueError(f'ModelConfig.joint_depth must be at least 1, got {self.joint_depth}')
        if self.decoder_attention not in ('self', 'cross'):
            raise ValueError(f"ModelConfig.decoder_attention must be 'self' or 'cross', got {self.decoder_attention!r}")


# -----------------------------------------------------------------------------
# building blocks

def sincos_pos_embed_2d(dim, grid_h, grid_w):
    """2-D sin-cos positions (grid_h * grid_w, dim), row-major, as MAE's: channels code the column, then the row."""
    def sincos_1d(d, pos):  # (M,) -> (M, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]  # (M, d/2)
        return torch.cat([out.sin(), out.cos()], dim=1)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing='ij')
    emb = [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())]
    return torch.cat(emb, dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention: forward runs the fused kernel (SDPA), forward_with_weights an
    explicit softmax for the one pass that reads the weights (the teacher's joint layer)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x):  # (B, N, D) -> q, k, v, each (B, H, N, hd)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4)

    def merge_heads(self, x):  # (B, H, n, hd) -> (B, n, D), through the output projection
        return self.proj(x.transpose(1, 2).flatten(2))

    def forward(self, x, n_out=None, segments=None):
        """x (B, N, D) -> outputs of the first n_out tokens (B, n_out, D), all N when None;
        segments: lengths of independent sequences packed along N, attention within each."""
        q, k, v = self.split_heads(x)
        if segments is None:
            out = F.scaled_dot_product_attention(q[:, :, :n_out], k, v)  # (B, H, n_out, hd)
            return self.merge_heads(out)
        if n_out is not None:
            raise ValueError('Attention: n_out and packed segments do not combine')
        heads = [F.scaled_dot_product_attention(*qkv)
                 for qkv in zip(*(t.split(segments, dim=2) for t in (q, k, v)))]
        return self.merge_heads(torch.cat(heads, dim=2))  # from (B, H, N, hd)

    def forward_with_weights(self, x, n_out=None):
        """forward (one sequence) -> (outputs (B, n_out or N, D), weights (B, H, N, N))."""
        q, k, v = self.split_heads(x)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, N, N)
        return self.merge_heads(attn[:, :, :n_out] @ v), attn


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; a joint block has LayerNorm pairs for the fused (norm1/2), audio (_a) and
    visual (_v) passes around shared attention and MLP (CAV-MAE). eps 1e-5 as the release's."""

    def __init__(self, dim, num_heads, mlp_ratio, joint=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        if joint:
            self.norm1_a, self.norm2_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.norm1_v, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def norms(self, modality):
        """The LayerNorm pair of a pass: 'av' (fused, and every non-joint block), 'a', 'v'."""
        suffix = {'av': '', 'a': '_a', 'v': '_v'}[modality]
        return getattr(self, 'norm1' + suffix), getattr(self, 'norm2' + suffix)

    def forward(self, x, modality='av', n_out=None, segments=None):
        """x (B, N, D) -> (B, n_out or N, D): n_out and segments as in Attention.forward."""
        norm1, norm2 = self.norms(modality)
        x = x[:, :n_out] + self.attn(norm1(x), n_out, segments)
        return x + self.mlp(norm2(x))

    def forward_with_attention(self, x, modality='av', n_out=None):
        """forward plus the attention weights (B, H, N, N) (the teacher's joint layer only)."""
        norm1, norm2 = self.norms(modality)
        h, attn = self.attn.forward_with_weights(norm1(x), n_out)
        x = x[:, :n_out] + h
        return x + self.mlp(norm2(x)), attn


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, H/p * W/p, D), row-major
        return self.proj(x).flatten(2).transpose(1, 2)


# -----------------------------------------------------------------------------
# DiffMAViL's decoder options: diffused mask tokens (the DDPM schedule, CAVMAESync.diffuse and
# mask_tokens) and the cross-attention decoder (CrossBlock, CAVMAESync.cross_decode)

def diffusion_alpha_bar(num_steps=1000):
    """DiffMAViL's DDPM schedule, betas linear from 1e-4 to 0.02 to the power 0.8 -> abar
    (num_steps,), abar[t - 1] = prod_{s <= t} (1 - beta_s), t = 1..num_steps."""
    betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64) ** 0.8
    return torch.cumprod(1.0 - betas, dim=0).float()


class CrossBlock(nn.Module):
    """DiffMAViL's pre-norm cross-attention block: queries x (B, Nq, D) attend to latents (B, Nk, D)
    (never to each other), then an MLP on the queries; the latents are only keys/values."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, latents):
        (B, Nq, D), Nk, H = x.shape, latents.shape[1], self.num_heads
        q = self.q(self.norm_q(x)).view(B, Nq, H, D // H).transpose(1, 2)  # (B, H, Nq, hd)
        kv = self.kv(self.norm_kv(latents)).view(B, Nk, 2, H, D // H)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (B, H, Nk, hd) each
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Nq, D)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x))


# -----------------------------------------------------------------------------
# the model

class CAVMAESync(nn.Module):
    def __init__(self, config, decoder=True):
        """decoder=False builds the encoder-only model used as the EMA teacher."""
        super().__init__()
        self.config = c = config
        p, D = c.patch_size, c.embed_dim
        self.grid_a = (c.num_mel_bins // p, c.audio_length // p)  # (freq, time)
        self.grid_v = (c.img_size // p, c.img_size // p)
        self.num_patches_a = self.grid_a[0] * self.grid_a[1]
        self.num_patches_v = self.grid_v[0] * self.grid_v[1]
        self.patch_embed_a, self.patch_embed_v = PatchEmbed(1, D, p), PatchEmbed(3, D, p)
        self.register_buffer('pos_embed_a', sincos_pos_embed_2d(D, *self.grid_a)[None])  # 1, Na, D
        self.register_buffer('pos_embed_v', sincos_pos_embed_2d(D, *self.grid_v)[None])  # 1, Nv, D
        self.modality_a, self.modality_v = nn.Parameter(torch.zeros(1, 1, D)), nn.Parameter(torch.zeros(1, 1, D))
        if c.global_token:  # the official name for the global token is cls_token
            self.cls_token_a, self.cls_token_v = nn.Parameter(torch.zeros(1, 1, D)), nn.Parameter(torch.zeros(1, 1, D))
        if c.num_registers:  # first audio, then visual
            self.register_tokens = nn.Parameter(torch.zeros(2 * c.num_registers, D))
        blocks = lambda n, joint=False: nn.ModuleList(  # noqa: E731
            [Block(D, c.num_heads, c.mlp_ratio, joint) for _ in range(n)])
        self.blocks_a, self.blocks_v = blocks(c.modality_depth), blocks(c.modality_depth)
        self.blocks_u = blocks(c.joint_depth, joint=True)
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.has_decoder = decoder
        if decoder:
            self._build_decoder()
        self._init_weights()

    def _build_decoder(self):
        c, p, Dd = self.config, self.config.patch_size, self.config.decoder_embed_dim
        self.decoder_embed = nn.Linear(c.embed_dim, Dd)
        if not c.diffused_mask_tokens:  # with diffused tokens it would get no gradient (DDP stops)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer('decoder_pos_embed_a', sincos_pos_embed_2d(Dd, *self.grid_a)[None])
        self.register_buffer('decoder_pos_embed_v', sincos_pos_embed_2d(Dd, *self.grid_v)[None])
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        block = CrossBlock if c.decoder_attention == 'cross' else Block
        self.decoder_blocks = nn.ModuleList([block(Dd, c.decoder_num_heads, c.mlp_ratio)
                                             for _ in range(c.decoder_depth)])
        if c.diffused_mask_tokens:  # only when on: the default state dict stays the official one
            self.decoder_noise_embed_a, self.decoder_noise_embed_v = nn.Linear(p * p, Dd), nn.Linear(p * p * 3, Dd)
            self.register_buffer('alpha_bar', diffusion_alpha_bar(), persistent=False)  # (T,)
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred_a, self.decoder_pred_v = nn.Linear(Dd, p * p), nn.Linear(Dd, p * p * 3)

    def _init_weights(self):
        """As the releases: xavier for linear layers and patch filters, N(0, 0.02) for the global,
        mask and modality tokens, N(0, 1) for the register tokens (torch.randn, never re-drawn)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for embed in (self.patch_embed_a, self.patch_embed_v):
            nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
        for name, param in self.named_parameters():
            if 'token' in name or 'modality' in name:
                nn.init.normal_(param, std=1.0 if name == 'register_tokens' else 0.02)

    # --- inputs ------------------------------------------------------------------

    def patchify_audio(self, audio):  # (B, L, F) -> (B, Na, p*p), row-major over (freq, time)
        p, (f, t) = self.config.patch_size, self.grid_a
        x = audio.transpose(1, 2).reshape(-1, f, p, t, p).permute(0, 1, 3, 2, 4)  # (B, f, t, p, p)
        return x.reshape(-1, f * t, p * p)

    def unpatchify_audio(self, x):  # (B, Na, p*p) -> (B, L, F)
        p, (f, t) = self.config.patch_size, self.grid_a
        x = x.reshape(-1, f, t, p, p).permute(0, 1, 3, 2, 4).reshape(-1, f * p, t * p)  # (B, F, L)
        return x.transpose(1, 2)

    def patchify_image(self, image):  # (B, 3, H, W) -> (B, Nv, p*p*3), pixels (row, col, channel)
        p, (h, w) = self.config.patch_size, self.grid_v
        x = image.reshape(-1, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
        return x.reshape(-1, h * w, p * p * 3)

    def unpatchify_image(self, x):  # (B, Nv, p*p*3) -> (B, 3, H, W)
        p, (h, w) = self.config.patch_size, self.grid_v
        x = x.reshape(-1, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, p)
        return x.reshape(-1, 3, h * p, w * p)

    def embed_audio(self, audio):  # (B, L, F) -> (B, Na, D): patches + fixed position + modality
        x = self.patch_embed_a(audio.transpose(1, 2).unsqueeze(1))  # input (B, 1, F, L)
        return x + self.pos_embed_a + self.modality_a

    def embed_image(self, image):  # (B, 3, H, W) -> (B, Nv, D)
        return self.patch_embed_v(image) + self.pos_embed_v + self.modality_v

    # --- encoders ----------------------------------------------------------------

    def add_tokens(self, x, modality):
        """Patch embeddings x (B, k, D) -> (B, [1 +] k [+ R], D): the global token first when
        configured, the modality's R register tokens last (CAV-MAE Sync)."""
        B, R = x.shape[0], self.config.num_registers
        if self.config.global_token:
            x = torch.cat([getattr(self, 'cls_token_' + modality).expand(B, -1, -1), x], dim=1)
        if R:
            registers = self.register_tokens[:R] if modality == 'a' else self.register_tokens[R:]
            x = torch.cat([x, registers.expand(B, -1, -1)], dim=1)
        return x

    def encode(self, x, modality):
        """Modality encoder on (visible) patch embeddings x (B, k, D) -> (B, [1 +] k, D), global
        token first when configured; the registers are appended for the encoder, dropped after."""
        x = self.add_tokens(x, modality)
        for blk in (self.blocks_a if modality == 'a' else self.blocks_v):
            x = blk(x)
        return x[:, :x.shape[1] - self.config.num_registers]

    def encode_pair(self, x1, x2, modality):
        """(encode(x1, modality), encode(x2, modality)) for two views x1 (B, k1, D), x2 (B, k2, D),
        packed into one sequence (attention within each): one matmul per layer for both, faster."""
        seqs = [self.add_tokens(x, modality) for x in (x1, x2)]
        lengths = [seq.shape[1] for seq in seqs]
        h = torch.cat(seqs, dim=1)  # (B, n1 + n2, D)
        for blk in (self.blocks_a if modality == 'a' else self.blocks_v):
            h = blk(h, segments=lengths)
        R = self.config.num_registers
        return tuple(seq[:, :n - R] for seq, n in zip(h.split(lengths, dim=1), lengths))

    # --- joint layer -------------------------------------------------------------

    def joint(self, x, modality, tokens=True):
        """Joint layer's single-modality pass (the modality's LayerNorms, then norm_a / norm_v):
        x (B, [1 +] k, D) -> (embedding (B, D), patch tokens (B, k, D) or None). tokens=False: the
        last block computes attention output, projection and MLP for the global token alone."""
        n_out = 1 if self.config.global_token and not tokens else None
        for i, blk in enumerate(self.blocks_u):
            x = blk(x, modality, n_out if i == len(self.blocks_u) - 1 else None)
        x = (self.norm_a if modality == 'a' else self.norm_v)(x)
        if self.config.global_token:
            return x[:, 0], (x[:, 1:] if tokens else None)
        return x.mean(dim=1), x  # CAV-MAE style: mean-pooled patch tokens

    def joint_attention(self, x, modality):
        """The teacher's joint pass, joint(x, modality, tokens=False) -> (embedding (B, D),
        attention weights (B, H, N, N) of the last joint block): the one explicit attention."""
        if not self.config.global_token:
            raise ValueError('teacher-guided masking needs global_token=True (priorities: attention to it)')
        for blk in self.blocks_u[:-1]:
            x = blk(x, modality)
        x, attn = self.blocks_u[-1].forward_with_attention(x, modality, n_out=1)  # (B, 1, D)
        return (self.norm_a if modality == 'a' else self.norm_v)(x[:, 0]), attn

    # --- decoder -----------------------------------------------------------------

    def fused_decode(self, enc_a, enc_v, keep_a, keep_v, patches_a=None, patches_v=None, diffusion=None):
        """Fused joint pass over both modalities' visible patches, then the decoder: enc_a (B, [1 +]
        ka, D), keep_a (B, ka) -> predictions (B, Na, p*p), (B, Nv, p*p*3) (the cross decoder:
        zeros at the visible ones). patches_a, patches_v, diffusion: for mask_tokens."""
        G = int(self.config.global_token)
        x = torch.cat([enc_a[:, G:], enc_v[:, G:]], dim=1)  # visible patch tokens (B, ka + kv, D)
        for blk in self.blocks_u:
            x = blk(x, 'av')
        x = self.decoder_embed(self.norm(x))  # (B, ka + kv, Dd)
        # decoder input: visible latents at keep, mask tokens (DiffMAViL: noised patches) elsewhere
        fill_a, fill_v = self.mask_tokens(x.shape[0], patches_a, patches_v, diffusion)  # (B, N, Dd)
        ka = keep_a.shape[1]
        a = masking.place(x[:, :ka], keep_a, fill_a) + self.decoder_pos_embed_a + self.decoder_modality_a
        v = masking.place(x[:, ka:], keep_v, fill_v) + self.decoder_pos_embed_v + self.decoder_modality_v
        # decoder: masked queries on visible latents (DiffMAViL), or self-attention (CAV-MAE Sync)
        if self.config.decoder_attention == 'cross':
            return (self.cross_decode(a, keep_a, self.decoder_pred_a),
                    self.cross_decode(v, keep_v, self.decoder_pred_v))
        x = torch.cat([a, v], dim=1)  # all positions of both modalities (B, Na + Nv, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        Na = self.num_patches_a
        return self.decoder_pred_a(x[:, :Na]), self.decoder_pred_v(x[:, Na:])

    def mask_tokens(self, B, patches_a, patches_v, diffusion=None):
        """The decoder input at the masked positions, (B, Na, Dd), (B, Nv, Dd): the mask token, or
        DiffMAViL's raw patches (B, N, P), DDPM-noised and projected. diffusion: (t (B,) in 1..T,
        eps_a, eps_v) from the caller (train.py's shared generator); None draws them here."""
        if not self.config.diffused_mask_tokens:
            if diffusion is not None:
                raise ValueError('diffusion noise given, but diffused_mask_tokens is off')
            return (self.mask_token.expand(B, self.num_patches_a, -1),
                    self.mask_token.expand(B, self.num_patches_v, -1))
        if patches_a is None or patches_v is None:
            raise ValueError('diffused_mask_tokens needs the raw patches patches_a and patches_v')
        # decision: one t per clip for all its patches and both modalities (DiffMAViL: per sample);
        # every patch is noised and projected (simpler), the visible ones are then overwritten
        if diffusion is None:
            t = torch.randint(1, self.alpha_bar.shape[0] + 1, (B,), device=patches_a.device)
            eps_a, eps_v = torch.randn_like(patches_a), torch.randn_like(patches_v)
        else:
            t, eps_a, eps_v = diffusion
        return (self.decoder_noise_embed_a(self.diffuse(patches_a, t, eps_a)),   # (B, Na, Dd)
                self.decoder_noise_embed_v(self.diffuse(patches_v, t, eps_v)))   # (B, Nv, Dd)

    def diffuse(self, x0, t, eps):
        """DDPM forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t (B,) in 1..T."""
        abar = self.alpha_bar[t - 1].view(-1, 1, 1)  # (B, 1, 1)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps

    def cross_decode(self, x, keep, pred):
        """DiffMAViL's decoder on one modality's input x (B, N, Dd), masked positions the queries,
        visible ones the keys/values -> predictions (B, N, P), zeros at the visible positions."""
        masked = masking.masked_indices(keep, x.shape[1])  # (B, N - k)
        q, latents = masking.gather(x, masked), masking.gather(x, keep)  # (B, N-k, Dd), (B, k, Dd)
        for blk in self.decoder_blocks:
            q = blk(q, latents)  # the visible latents stay fixed: the same keys/values each block
        q = pred(self.decoder_norm(q))  # (B, N - k, P)
        return masking.place(q, masked, q.new_zeros(*x.shape[:2], q.shape[-1]))  # (B, N, P)

    # --- the passes ------------------------------------------------------------------

    def forward(self, audio, image, keep_a, keep_v, con_keep_a=None, con_keep_v=None, diffusion=None):
        """A training step's student work, one call so that DDP sees one forward. audio (B, L, F),
        image (B, 3, H, W); keep_a (B, ka), keep_v (B, kv): the reconstruction view's visible patches;
        con_keep_a, con_keep_v: the contrastive view (TG-DP), None for CAV-MAE Sync's single view.
        -> dict(loss, loss_a, loss_v, pred_a, pred_v, mask_a, mask_v (1 = masked), g_a, g_v)."""
        if (con_keep_a is None) != (con_keep_v is None):
            raise ValueError('forward: the contrastive view of both modalities (con_keep_a, con_keep_v), or neither')
        # 1. embed the patches, once per modality: every view gathers from them
        emb_a, emb_v = self.embed_audio(audio), self.embed_image(image)  # (B, Na, D), (B, Nv, D)
        # 2. encoders on the visible patches
        if con_keep_a is None:  # CAV-MAE Sync: the one encoding feeds both objectives
            enc_a = self.encode(masking.gather(emb_a, keep_a), 'a')  # (B, 1 + ka, D)
            enc_v = self.encode(masking.gather(emb_v, keep_v), 'v')  # (B, 1 + kv, D)
            con_a, con_v = enc_a, enc_v
        else:  # TG-DP: a second, contrastive view, packed with the first through the encoders
            enc_a, con_a = self.encode_pair(masking.gather(emb_a, keep_a),  # (B, 1+ka, D),
                                            masking.gather(emb_a, con_keep_a), 'a')  # (B, 1+ca, D)
            enc_v, con_v = self.encode_pair(masking.gather(emb_v, keep_v),  # (B, 1+kv, D),
                                            masking.gather(emb_v, con_keep_v), 'v')  # (B, 1+cv, D)
        # 3. the fused joint pass and the decoder on the reconstruction view
        patches_a, patches_v = self.patchify_audio(audio), self.patchify_image(image)  # the targets
        pred_a, pred_v = self.fused_decode(enc_a, enc_v, keep_a, keep_v, patches_a, patches_v,
                                           diffusion)  # (B, Na, p*p), (B, Nv, p*p*3)
        # 4. loss: MSE on the masked patches per modality
        mask_a = masking.mask_of(keep_a, self.num_patches_a)  # (B, Na), 1 = masked
        mask_v = masking.mask_of(keep_v, self.num_patches_v)  # (B, Nv)
        loss_a = mae_loss(pred_a, patches_a, mask_a, self.config.norm_pix_loss)
        loss_v = mae_loss(pred_v, patches_v, mask_v, self.config.norm_pix_loss)
        # 5. global tokens: the joint layer's audio and visual passes on the contrastive view
        g_a, g_v = self.joint(con_a, 'a', tokens=False)[0], self.joint(con_v, 'v', tokens=False)[0]  # (B, D)
        return dict(loss=loss_a + loss_v, loss_a=loss_a, loss_v=loss_v, pred_a=pred_a,
                    pred_v=pred_v, mask_a=mask_a, mask_v=mask_v, g_a=g_a, g_v=g_v)

    @torch.no_grad()
    def forward_teacher(self, audio, image):
        """Full inputs -> (g_a, g_v, attn_a (B, Na), attn_v (B, Nv)): each patch query's head-mean
        attention to the global key in the last joint block, raw (masking.teacher_priority
        normalises it; the release's Gumbel reading ranks the raw scale)."""
        out = []
        for modality, x in (('a', self.embed_audio(audio)), ('v', self.embed_image(image))):
            g, attn = self.joint_attention(self.encode(x, modality), modality)
            out += [g, attn[:, :, 1:, 0].float().mean(dim=1)]  # (B, D), (B, N): patch -> global
        g_a, attn_a, g_v, attn_v = out
        return g_a, g_v, attn_a, attn_v

    def forward_features(self, audio, image, tokens=True):
        """Unmasked inference -> (g_a, g_v (B, D), tokens_a (B, Na, D), tokens_v (B, Nv, D)) after
        norm_a / norm_v; tokens=False: (g_a, g_v, None, None)."""
        g_a, tokens_a = self.joint(self.encode(self.embed_audio(audio), 'a'), 'a', tokens=tokens)
        g_v, tokens_v = self.joint(self.encode(self.embed_image(image), 'v'), 'v', tokens=tokens)
        return g_a, g_v, tokens_a, tokens_v


# -----------------------------------------------------------------------------
# analytic FLOP count (matmuls only; they are > 99% of the work)

def block_flops(n, dim, mlp_ratio):
    """Forward FLOPs of one ViT block on n tokens: qkv, proj and MLP, then attention."""
    return 2 * n * dim * dim * (4 + 2 * mlp_ratio) + 4 * n * n * dim


def cross_block_flops(nq, nk, dim, mlp_ratio):
    """Forward FLOPs of one CrossBlock: q, proj, MLP on nq queries, k/v on nk latents, attention."""
    return 2 * nq * dim * dim * (2 + 2 * mlp_ratio) + 4 * nk * dim * dim + 4 * nq * nk * dim


def forward_flops(c, mask_ratio, passes):
    """Forward FLOPs per clip of each module for a pass: 'reconstruction' (masked encoders, fused
    joint pass, decoder), 'sync' (plus the joint audio/visual passes), 'contrastive' (masked
    encoders, joint audio/visual passes: forward's second view), 'full' (forward_features),
    'teacher' (forward_teacher); embedding-only passes skip the last joint block's patch outputs."""
    p, D, Dd, r = c.patch_size, c.embed_dim, c.decoder_embed_dim, c.mlp_ratio
    Na, Nv = (c.num_mel_bins // p) * (c.audio_length // p), (c.img_size // p) ** 2
    full = passes in ('full', 'teacher')  # unmasked
    ka = Na if full else masking.num_keep(Na, mask_ratio)
    kv = Nv if full else masking.num_keep(Nv, mask_ratio)
    G, R = int(c.global_token), c.num_registers
    out = {'patch_embed': 2 * (Na * p * p + Nv * 3 * p * p) * D}  # all embedded, then gathered
    out['encoders'] = c.modality_depth * (block_flops(G + ka + R, D, r) + block_flops(G + kv + R, D, r))
    if passes in ('reconstruction', 'sync'):
        out['joint_fused'] = c.joint_depth * block_flops(ka + kv, D, r)
        Pa, Pv = p * p, p * p * 3  # patch sizes: prediction heads' (and noise projections') widths
        if c.decoder_attention == 'cross':  # blocks per modality, heads on masked positions only
            blocks = cross_block_flops(Na - ka, ka, Dd, r) + cross_block_flops(Nv - kv, kv, Dd, r)
            out['decoder'] = c.decoder_depth * blocks + 2 * ((Na - ka) * Pa + (Nv - kv) * Pv) * Dd
        else:
            out['decoder'] = c.decoder_depth * block_flops(Na + Nv, Dd, r) + 2 * (Na * Pa + Nv * Pv) * Dd
        out['decoder'] += 2 * (ka + kv) * D * Dd  # decoder_embed on the visible latents
        if c.diffused_mask_tokens:
            out['decoder'] += 2 * (Na * Pa + Nv * Pv) * Dd  # decoder_noise_embed_a/v on every patch
    if passes in ('sync', 'contrastive', 'full', 'teacher'):
        def joint_pass(n):  # one modality's joint pass on n tokens
            if passes == 'full' or not G:
                return c.joint_depth * block_flops(n, D, r)
            # last block, embedding only (n_out=1): qkv on all tokens, proj, MLP and attention for
            # the global query; the teacher's explicit attention also scores every other query
            attention = 2 * n * n * D + 2 * n * D if passes == 'teacher' else 4 * n * D
            last = 6 * n * D * D + 2 * D * D * (1 + 2 * r) + attention
            return (c.joint_depth - 1) * block_flops(n, D, r) + last
        out['joint_global'] = joint_pass(G + ka) + joint_pass(G + kv)
    return out


# -----------------------------------------------------------------------------
# teacher, precision, schedules

def make_teacher(student):
    """Encoder-only EMA copy of the student: no decoder, no gradients, never in the optimiser."""
    teacher = CAVMAESync(student.config, decoder=False).to(next(student.parameters()).device)
    keys = teacher.state_dict()
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k in keys})
    teacher.requires_grad_(False)
    return teacher.eval()


def autocast(device, dtype):
    """The one mixed-precision policy: 'float32' as is, 'bfloat16' / 'float16' under autocast."""
    if dtype == 'float32':
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def warmup_cosine(step, total, warmup, start, end):
    """Linear warmup from 0 to `start` over `warmup` steps, then a half cosine to `end` at step
    `total`: the learning rates, and (warmup 0) the teacher's EMA momentum ramp."""
    if step < warmup:
        return start * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (1.0 + math.cos(math.pi * progress)) * (start - end)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, over the teacher's parameters."""
    student_params = dict(student.named_parameters())
    t_params = [p for _, p in teacher.named_parameters()]
    s_params = [student_params[name].detach() for name, _ in teacher.named_parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)  # one fused kernel over all tensors


# -----------------------------------------------------------------------------
# loading weights: load_weights is the one entry point, for train.py (init_from) and evaluate.py
# (load_model), for every layout: train.py checkpoints, the releases, CAV-MAE files, ImageNet MAE

_UNUSED_NORM = re.compile(r'^(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.(weight|bias)$')
_FIXED_POSITIONS = re.compile(r'^(decoder_)?pos_embed_[av]$')  # sin-cos buffers here
KIND_NAMES = {'train': 'train.py checkpoint', 'official': 'official CAV-MAE Sync / TG-DP release',
              'cavmae': "CAV-MAE layout (e.g. the releases' ori_mae_11_for_pretrain.pth)",
              'mae': 'ImageNet MAE ViT weights'}


def read_checkpoint(path):
    """torch.load(path) on the CPU, tensors and plain containers only (weights_only: a release is a
    file from the internet; MAE's full file adds an argparse.Namespace). Errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{path}: cannot be read as a checkpoint of tensors ({type(e).__name__}: {e})') from e


def convert_official_state_dict(sd, config=None):
    """Official CAV-MAE Sync / TG-DP state dict -> CAVMAESync(config)'s, less the unused
    audio/visual LayerNorms outside the joint blocks; another unknown or missing key is an error."""
    with torch.device('meta'):
        expected = CAVMAESync(config or ModelConfig()).state_dict()
    out = {}
    for key, value in sd.items():
        name = key.removeprefix('module.')
        if _UNUSED_NORM.match(name):
            continue
        if name not in expected:
            raise KeyError(f'official checkpoint key {key!r} has no place in CAVMAESync')
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f'official checkpoint key {key!r} has shape {tuple(value.shape)}, '
                             f'expected {tuple(expected[name].shape)}')
        out[name] = value
    missing = sorted(set(expected) - set(out))
    if missing:
        raise KeyError(f'official checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}')
    return out


def checkpoint_kind(ckpt):
    """A loaded checkpoint's layout, a key of KIND_NAMES: 'official' has blocks_u.* and register
    or two global tokens, 'cavmae' blocks_u.* without (ori_mae_11_for_pretrain.pth has a third,
    cls_token_av), 'mae' blocks.* and patch_embed. State dicts may be under 'model', 'module.'."""
    if isinstance(ckpt, dict) and 'model_args' in ckpt and 'model' in ckpt:
        return 'train'
    sd = ckpt.get('model', ckpt) if isinstance(ckpt, dict) else None
    names = {k.removeprefix('module.') for k in sd} if isinstance(sd, dict) else set()
    if any(n.startswith('blocks_u.') for n in names):
        if 'register_tokens' in names or ('cls_token_a' in names and 'cls_token_av' not in names):
            return 'official'
        return 'cavmae'
    if any(n.startswith('blocks.') for n in names) and 'patch_embed.proj.weight' in names:
        return 'mae'
    raise ValueError('checkpoint is neither a train.py checkpoint (no model_args), a CAV-MAE '
                     '(Sync) state dict (no blocks_u.*) nor MAE weights (no blocks.*, patch_embed)')


def _summary(names):  # block indices folded, 'decoder_blocks.* (12)', so that a report stays short
    groups = collections.Counter(re.sub(r'\.\d+\..*$', '.*', name) for name in names)
    return ', '.join(g if n == 1 else f'{g} ({n})' for g, n in groups.items()) or 'none'


def _mae_mapping(sd, c):
    """ImageNet MAE ViT weights -> {name: (MAE key, tensor)}, as CAV-MAE's adapt_vmae_weights.py
    builds the file CAV-MAE (Sync) and TG-DP start from: the first blocks into both encoders, the
    next into the joint layer (its norms copied to all three pairs), the audio patch filter the SUM
    of the RGB ones, the audio head decoder_pred's first p*p rows. MAE's pos_embed: unused."""
    out = {}
    def put(key, value, *names):
        out.update({name: (key, value) for name in names})
    for key, value in sd.items():
        block = re.match(r'(decoder_)?blocks\.(\d+)\.(.*)$', key)
        if block and block.group(1):  # decoder blocks: the same names in the self-attention decoder
            if c.decoder_attention == 'self':  # not half a block into a CrossBlock (norm2, mlp)
                put(key, value, f'decoder_blocks.{block.group(2)}.{block.group(3)}')
        elif block:
            i, rest = int(block.group(2)), block.group(3)
            if i < c.modality_depth:
                put(key, value, f'blocks_a.{i}.{rest}', f'blocks_v.{i}.{rest}')
            elif i < c.modality_depth + c.joint_depth:
                names = [rest]
                if rest.startswith(('norm1.', 'norm2.')):  # the fused pair, copied to the a/v pairs
                    names += [rest.replace('.', '_a.', 1), rest.replace('.', '_v.', 1)]
                put(key, value, *(f'blocks_u.{i - c.modality_depth}.{name}' for name in names))
        elif key == 'patch_embed.proj.weight':  # (D, 3, p, p)
            put(key, value, 'patch_embed_v.proj.weight')
            put(key, value.sum(dim=1, keepdim=True), 'patch_embed_a.proj.weight')  # (D, 1, p, p)
        elif key == 'patch_embed.proj.bias':
            put(key, value, 'patch_embed_v.proj.bias', 'patch_embed_a.proj.bias')
        elif key in ('norm.weight', 'norm.bias'):
            put(key, value, *(key.replace('norm', n, 1) for n in ('norm', 'norm_a', 'norm_v')))
        elif key == 'cls_token':
            put(key, value, 'cls_token_a', 'cls_token_v')
        elif key in ('decoder_embed.weight', 'decoder_embed.bias', 'mask_token',
                     'decoder_norm.weight', 'decoder_norm.bias'):
            put(key, value, key)
        elif key in ('decoder_pred.weight', 'decoder_pred.bias'):  # (p*p*3, Dd): row, col, channel
            put(key, value, key.replace('pred', 'pred_v'))
            put(key, value[:c.patch_size ** 2], key.replace('pred', 'pred_a'))  # release: [:256]
    return out


def _load_by_name(model, kind, sd, name, verbose):
    """load_weights for 'mae' (_mae_mapping) and 'cavmae' (by name, as the releases load
    ori_mae_11_for_pretrain.pth; its position tables are for 10 s of audio). Names the model lacks
    are skipped, a shape mismatch is an error naming both keys; register tokens stay at init."""
    c = model.config
    if kind == 'mae':
        mapping = _mae_mapping(sd, c)
    else:
        mapping = {}
        for key, value in sd.items():
            n = key.removeprefix('module.')
            cross = n.startswith('decoder_blocks.') and c.decoder_attention == 'cross'
            if not (_FIXED_POSITIONS.match(n) or _UNUSED_NORM.match(n) or cross):
                mapping[n] = (key, value)
    target = model.state_dict()
    load = {}
    for n, (key, value) in mapping.items():
        if n not in target:
            continue
        if tuple(value.shape) != tuple(target[n].shape):
            raise ValueError(f'{name} ({KIND_NAMES[kind]}): {key!r} -> {n} has shape '
                             f'{tuple(value.shape)}, the model expects {tuple(target[n].shape)}')
        load[n] = value
    model.load_state_dict(load, strict=False)
    unused = sorted(set(sd) - {mapping[n][0] for n in load})
    at_init = sorted(n for n, _ in model.named_parameters() if n not in load)
    if verbose:
        print(f'initialised from {name}: {KIND_NAMES[kind]}: loaded {len(load)} tensors\n'
              f'  source keys not used: {_summary(unused)}\n'
              f'  parameters left at init: {_summary(at_init)}')
    return dict(kind=kind, loaded=sorted(load), unused=unused, at_init=at_init)


def load_weights(model, source, weights='model', verbose=True, name=None):
    """Weights from source (a path or a loaded checkpoint) into a built CAVMAESync, by
    checkpoint_kind: 'train' its `weights` ('model' or 'teacher'), strict; 'official' converted,
    strict; 'mae', 'cavmae' _load_by_name. Prints what was loaded and what stayed at init (name:
    the source's name in it, default its path). -> dict(kind, loaded, unused, at_init)."""
    if weights not in ('model', 'teacher'):
        raise ValueError(f"weights must be 'model' or 'teacher', got {weights!r}")
    name = name or (source if isinstance(source, str) else 'checkpoint')
    ckpt = read_checkpoint(source) if isinstance(source, str) else source
    try:
        kind = checkpoint_kind(ckpt)
    except ValueError as e:
        raise ValueError(f'{name}: {e}') from None
    if weights == 'teacher' and kind != 'train':
        raise ValueError(f'{name}: an {KIND_NAMES[kind]} has no teacher weights (only train.py checkpoints do)')
    if kind in ('mae', 'cavmae'):
        return _load_by_name(model, kind, ckpt.get('model', ckpt), name, verbose)
    if kind == 'train':
        sd = ckpt[weights]
        if sd is None:
            raise ValueError(f'{name}: this run kept no {weights} weights')
        what = f'{KIND_NAMES[kind]}, {weights} weights, iteration {ckpt.get("iter_num", "?")}'
    else:
        sd = convert_official_state_dict(ckpt.get('model', ckpt), model.config)
        what = KIND_NAMES[kind]
    model.load_state_dict(sd)  # strict: every tensor, the right shapes
    if verbose:
        print(f'loaded {name} ({what}): all {len(sd)} tensors')
    return dict(kind=kind, loaded=sorted(sd), unused=[], at_init=[])
