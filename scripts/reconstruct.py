"""
MAE-style reconstruction picture: original / masked / reconstructed spectrogram and frame.

    python scripts/reconstruct.py --ckpt out/ckpt.pt --data eval.json --out rec/ [--num_clips 4] \
        [--mask_ratio 0.75]

For the first --num_clips clips (frame --frame, the middle one by default, and its audio segment),
three columns: the original, the masked input (masked patches grey; --mask_ratio of the patches of
each modality, random masks drawn from --seed) and the reconstruction (the decoder's predicted
masked patches with the visible ones, in input units: a norm_pix_loss model's per-patch predictions
are de-normalised with each patch's mean and variance). Per clip a spectrogram row (time left to
right, low frequencies at the bottom; one colour scale for its three cells) and a frame row. One
PNG: OUT if it ends in .png, else OUT/reconstruction.png. Needs the decoder: a train.py student
(--weights model).
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import masking
from evaluate import load_model, make_dataset
from model import autocast
from scripts.plot import (add_model_args, frame_to_rgb, parse_model_args, pick_frame, save_png,
                          spectrogram_to_rgb)

PAD, HEADER = 4, 16  # pixels between cells, height of the column titles
MASK_GREY = 128


def reconstruct_size(config, num_clips):
    """(width, height) of the grid: 3 columns; per clip a spectrogram row and a frame row."""
    cell_w = max(config.audio_length, config.img_size)
    row_h = config.num_mel_bins + config.img_size + 2 * PAD
    return 3 * cell_w + 4 * PAD, HEADER + num_clips * row_h + PAD


def reconstruction_columns(model, x, pred, mask, patchify, unpatchify):
    """One modality's (original, masked, reconstruction + visible, hole) from model outputs."""
    target, pred = patchify(x.float()), pred.float()  # (B, N, P)
    mask = mask.float()[..., None]  # (B, N, 1)
    if model.config.norm_pix_loss:  # predictions are per-patch normalised: back to input units
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    return (x.float(), unpatchify(target * (1 - mask)),
            unpatchify(pred * mask + target * (1 - mask)), unpatchify(mask.expand_as(target)) > 0.5)


def draw_grid(config, audio_cols, visual_cols, mask_ratio):
    """The PNG canvas: column titles, then per clip its spectrogram row and its frame row."""
    (a_orig, a_masked, a_rec, a_hole), (v_orig, v_masked, v_rec, v_hole) = audio_cols, visual_cols
    W, H = reconstruct_size(config, len(a_orig))
    cell_w = max(config.audio_length, config.img_size)
    canvas = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(('original', f'masked {mask_ratio:.0%}', 'reconstruction + visible')):
        draw.text((PAD + j * (cell_w + PAD) + 2, 2), title, fill='black',
                  font=ImageFont.load_default())
    y = HEADER
    for b in range(len(a_orig)):
        lo, hi = a_orig[b].min(), a_orig[b].max()  # one colour scale for the three spectrograms
        for j, (spec,
                hole) in enumerate(((a_orig[b], None), (a_masked[b], a_hole[b]), (a_rec[b], None))):
            rgb = spectrogram_to_rgb(spec, lo, hi)
            if hole is not None:
                rgb[hole.cpu().T.flip(0).numpy()] = MASK_GREY
            canvas.paste(Image.fromarray(rgb), (PAD + j * (cell_w + PAD), y))
        y += config.num_mel_bins + PAD
        for j, (img,
                hole) in enumerate(((v_orig[b], None), (v_masked[b], v_hole[b]), (v_rec[b], None))):
            rgb = frame_to_rgb(img)
            if hole is not None:
                rgb[hole[0].cpu().numpy()] = MASK_GREY
            canvas.paste(Image.fromarray(rgb), (PAD + j * (cell_w + PAD), y))
        y += config.img_size + PAD
    return canvas


@torch.no_grad()
def reconstruct(model, dataset, out_path, frame=None, num_clips=4, mask_ratio=0.75, device='cpu',
                seed=0, dtype='float32'):
    """MAE-style figure for the first num_clips clips (frame t, middle by default): columns original
    / masked (masked patches grey) / reconstruction (predicted masked patches + visible ones), a
    spectrogram row and a frame row per clip. Writes one PNG of reconstruct_size(config, n)."""
    if not getattr(model, 'has_decoder', True):
        raise ValueError('reconstruct needs the decoder: --weights model (the teacher has none)')
    batch = data.collate([dataset[i] for i in range(min(num_clips, len(dataset)))])
    T = batch['audio'].shape[1]
    t = pick_frame(frame, T)
    audio = batch['audio'][:, t].to(device)  # (B, L, F)
    image = batch['image'][:, t].to(device)  # (B, 3, H, W)
    gen = torch.Generator().manual_seed(seed)  # the random masks
    B, Na, Nv = audio.shape[0], model.num_patches_a, model.num_patches_v
    noise_a = torch.rand(B, Na, generator=gen).to(device)  # (B, Na)
    noise_v = torch.rand(B, Nv, generator=gen).to(device)  # (B, Nv)
    keep_a = masking.random_masking(B, Na, mask_ratio, noise=noise_a)[0]  # (B, ka)
    keep_v = masking.random_masking(B, Nv, mask_ratio, noise=noise_v)[0]  # (B, kv)
    with autocast(device, dtype):
        out = model(audio, image, keep_a, keep_v)  # CAV-MAE Sync's single view: no contrastive one
    audio_cols = reconstruction_columns(model, audio, out['pred_a'], out['mask_a'],
                                        model.patchify_audio, model.unpatchify_audio)
    visual_cols = reconstruction_columns(model, image, out['pred_v'], out['mask_v'],
                                         model.patchify_image, model.unpatchify_image)
    return save_png(draw_grid(model.config, audio_cols, visual_cols, mask_ratio), out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument('--data', required=True, help='dataset JSON or shard set')
    parser.add_argument('--out', required=True, help='output directory or .png path')
    parser.add_argument('--num_clips', type=int, default=4)
    parser.add_argument('--frame', type=int, help='frame index (default: the middle one)')
    parser.add_argument('--mask_ratio', type=float, default=0.75)
    parser.add_argument('--seed', type=int, default=0, help='the random masks')
    args = parse_model_args(parser, argv)
    model = load_model(args.ckpt, args.device, args.weights)
    dataset = make_dataset(args.data, None, model.config, args.num_frames)
    out = args.out if args.out.endswith('.png') else os.path.join(args.out, 'reconstruction.png')
    reconstruct(model, dataset, out, args.frame, args.num_clips, args.mask_ratio, args.device,
                args.seed, args.dtype)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
