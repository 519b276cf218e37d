r"""
Synthetic audio-visual clips in the CAV-MAE layout, learnable at tiny scale, with no
single-modality or whole-clip shortcut.

    python scripts/synth.py --out data_synth --num_clips 400 --seed 0
    python scripts/synth.py --out data_noisy --offscreen 0.3 --silent_objects 0.3 --clutter 3 \
        --hum 0.05

Design:
- K classes (default 10). Class c = visual signature (hue c/K, one of 5 shapes, solid or striped)
  + sound signature (pitch 200 Hz * 16^(c/(K-1)), 1/3/6 harmonics, steady or 2/4/8 Hz tremolo).
- Frame i shows the moment t_i = i * 0.64 s, the centre of its fbank segment (data.segment_bounds
  with S=1024 frames = 10.24 s). Time is cut into 16 slots of 0.64 s around the t_i; each clip
  switches on runs of 2-4 slots (5-13 of 16 in all): in "on" slots the class sound plays and the
  object is drawn, in "off" slots the audio is background only and the frame shows no object. So a
  frame and its segment agree on whether (and what) the event is, and the on/off pattern is a
  per-clip fingerprint visible in both modalities (the "diagonal mean" retrieval score sums it
  over t).
- Instance signals shared across modalities, for clip-to-clip retrieval within a class: pitch
  offset (+-2 semitones) <-> height of the object (higher pitch = higher up), loudness <-> size.
- Distractors (semantic noise, independent of the class): background noise of random level,
  silent stretches, frames with no object, random background tint/gradient, pixel noise, a grey
  distractor shape in ~30% of clips and noise clicks in ~30% of clips; horizontal position and
  drift of the object are random.
- More semantic noise of the kinds TG-DP names (all off by default, the defaults give the same
  clips byte for byte): --on_slots LO HI (fewer "on" slots: longer silent stretches), --offscreen P
  (a sound event whose object is off screen), --silent_objects P (a visible object of another
  class that makes no sound), --clutter N (static desaturated background shapes), --hum A (a steady
  off-screen background tone).
- Held-out split: every 5th clip of each class goes to eval.json (20%, classes balanced in both).
  Every clip draws from its own generator seeded by (seed, clip number): deterministic per seed.

Writes OUT/audio/{id}.wav (16 kHz PCM_16), OUT/frame_{i}/{id}.jpg, OUT/mask_{i}/{id}.png,
train.json, eval.json, labels.csv (index,mid,display_name), synth_meta.json (each clip's class and
on/off pattern, for checks) and synth_config.json (the settings). Object masks: an 8-bit PNG the
size of the frame, nonzero = the sounding object's pixels (empty when no sounding object is on
screen); the same format works for real data, scripts/localize.py reads it and the localisation
evaluation scores against it.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import colorsys
import csv
import json

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import HOP, SAMPLE_RATE, TARGET_FRAMES, frame_path
from scripts.localize import mask_path

SYNTH_SECONDS = 10
SYNTH_FRAMES = 16
SLOT = TARGET_FRAMES * HOP / SAMPLE_RATE / SYNTH_FRAMES  # 0.64 s: frame i shows time i * SLOT
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
HARMONICS = (1, 3, 6)  # timbre
TREMOLO_HZ = (0, 2, 4, 8)  # rhythm, 0 = steady tone


def synth_class(c, num_classes):
    """Signature of class c: hue in [0, 1), shape, striped, pitch (Hz), harmonics, tremolo (Hz)."""
    return dict(hue=c / num_classes, shape=SHAPES[c % len(SHAPES)],
                striped=(c // len(SHAPES)) % 2 == 1,
                pitch=200.0 * 16 ** (c / max(1, num_classes - 1)),
                harmonics=HARMONICS[c % len(HARMONICS)], tremolo=TREMOLO_HZ[c % len(TREMOLO_HZ)])


def shape_mask(shape, cx, cy, r, size):
    """(size, size) float mask of a shape of radius r centred at (cx, cy)."""
    mask = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == 'circle':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == 'square':
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=255)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=255)
    elif shape == 'diamond':
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif shape == 'cross':
        draw.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=255)
        draw.rectangle((cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r), fill=255)
    return np.asarray(mask, dtype=np.float32)[:, :, None] / 255.0  # (size, size, 1)


def harmonic_tone(pitch, harmonics, t, rng):
    """Sum of the first `harmonics` partials below 7 kHz (amplitude 1/k, random phases), peak ~1."""
    ks = [k for k in range(1, harmonics + 1) if k * pitch < 7000]
    tone = sum(np.sin(2 * np.pi * k * pitch * t + rng.uniform(0, 2 * np.pi)) / k for k in ks)
    return tone / sum(1 / k for k in ks)


def object_texture(colour, striped, xx, yy, S):
    """(S, S, 3) fill of an object: its colour, or diagonal bands 4 px wide of it."""
    if striped:
        stripes = ((xx + yy) * S // 4 % 2)[:, :, None]
        return colour * (0.45 + 0.55 * stripes)
    return np.broadcast_to(colour, (S, S, 3))


def synth_clip(number, c, num_classes, seed, frame_size=96, on_slots=(5, 10), offscreen=0.0,
               silent_objects=0.0, clutter=0, hum=0.0):
    """One synthetic clip -> (waveform (N,) float32 in [-1, 1], frames list of (S, S, 3) uint8,
    masks list of (S, S) bool: the pixels of the sounding object, meta).
    Semantic-noise options (the defaults give the original clips, byte for byte; every option draws
    from its own generator, so turning one on leaves the rest of the clip unchanged):
      on_slots        (lo, hi): a clip aims at lo..hi "on" slots of 16; fewer = longer silent
                      stretches
      offscreen       probability that a run of "on" slots is heard but its object is off screen
      silent_objects  probability that the clip shows an object of another class that makes no sound
      clutter         number of static, desaturated shapes in the background (uninformative patches)
      hum             level of a steady background tone at a random pitch from an off-screen
                      source"""
    rng = np.random.default_rng((seed, number))
    sig = synth_class(c, num_classes)
    # which of the 16 slots show/sound the object: runs of 2-4 slots,
    # on_slots[0]..on_slots[1] (+3) in all
    on = np.zeros(SYNTH_FRAMES, dtype=bool)
    target = rng.integers(on_slots[0], on_slots[1] + 1)
    runs = []  # (start, length) of each run drawn
    while on.sum() < target:
        n = rng.integers(2, 5)
        s = rng.integers(0, SYNTH_FRAMES - n + 1)
        on[s:s + n] = True
        runs.append((s, n))
    pitch_u = rng.uniform()  # instance signal: pitch offset <-> height
    loud_u = rng.uniform()  # instance signal: loudness <-> size
    # semantic noise, each from its own generator
    visible = on.copy()  # slots whose sounding object is on screen
    rng_off = np.random.default_rng((seed, number, 1))
    for s, n in runs:
        if rng_off.uniform() < offscreen:
            visible[s:s + n] = False

    # audio: class tone in the "on" slots + background noise (+ clicks)
    num_samples = SYNTH_SECONDS * SAMPLE_RATE
    t = np.arange(num_samples) / SAMPLE_RATE  # (N,)
    envelope = np.zeros(num_samples)
    ramp = int(0.01 * SAMPLE_RATE)  # 10 ms fades: no clicks at event edges
    for i in np.flatnonzero(on):
        a = max(0, int((i * SLOT - SLOT / 2) * SAMPLE_RATE))
        b = min(num_samples, int((i * SLOT + SLOT / 2) * SAMPLE_RATE))
        envelope[a:b] = 1.0
    edges = np.flatnonzero(np.diff(np.r_[0.0, envelope, 0.0]))  # run starts and ends
    for a, b in zip(edges[::2], edges[1::2]):
        n = min(ramp, (b - a) // 2)
        envelope[a:a + n] *= np.linspace(0, 1, n)
        envelope[b - n:b] *= np.linspace(1, 0, n)
    pitch = sig['pitch'] * 2 ** ((pitch_u * 4 - 2) / 12)  # +-2 semitones
    tone = harmonic_tone(pitch, sig['harmonics'], t, rng)
    if sig['tremolo']:
        tone *= 0.5 * (1 - np.cos(2 * np.pi * sig['tremolo'] * t + rng.uniform(0, 2 * np.pi)))
    loudness = 0.08 + 0.22 * loud_u
    waveform = loudness * envelope * tone + rng.normal(0, rng.uniform(0.002, 0.02), num_samples)
    if rng.uniform() < 0.3:  # distractor: noise clicks at random moments
        for start in rng.integers(0, num_samples - 320, size=3):
            waveform[start:start + 320] += rng.normal(0, 0.15, 320)
    hum_pitch = None
    if hum > 0:  # a steady tone from an off-screen source, anywhere in the classes' pitch range
        rng_hum = np.random.default_rng((seed, number, 2))
        hum_pitch = 200.0 * 16 ** rng_hum.uniform()
        level = hum * rng_hum.uniform(0.5, 1)  # drawn before the tone's phases
        waveform = waveform + level * harmonic_tone(hum_pitch, 2, t, rng_hum)
    waveform = np.clip(waveform, -1, 1).astype(np.float32)

    # frames: tinted grey background with a gradient, object only in "on" frames
    S = frame_size
    yy, xx = np.mgrid[0:S, 0:S] / S
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[:, :, None]  # (S, S, 1)
    background = rng.uniform(0.2, 0.5) + rng.uniform(-0.04, 0.04, 3) + 0.15 * (gradient - 0.5)
    if rng.uniform() < 0.3:  # distractor: a static grey shape
        d_shape = SHAPES[rng.integers(len(SHAPES))]
        m = shape_mask(d_shape, *rng.uniform(0.2 * S, 0.8 * S, 2), 0.12 * S, S)
        background = background * (1 - m) + 0.7 * m
    if clutter:  # static desaturated shapes: background patches that say nothing about the sound
        rng_clutter = np.random.default_rng((seed, number, 3))
        for _ in range(clutter):
            hue, sat = rng_clutter.uniform(), rng_clutter.uniform(0.1, 0.3)
            val = rng_clutter.uniform(0.3, 0.8)
            m = shape_mask(SHAPES[rng_clutter.integers(len(SHAPES))], *rng_clutter.uniform(0, S, 2),
                           S * rng_clutter.uniform(0.06, 0.16), S)
            background = background * (1 - m) + np.array(colorsys.hsv_to_rgb(hue, sat, val)) * m
    silent = None  # (slots shown, shape mask, texture) of a visible object that makes no sound
    rng_silent = np.random.default_rng((seed, number, 4))
    if rng_silent.uniform() < silent_objects:
        other = synth_class((c + rng_silent.integers(1, num_classes)) % num_classes, num_classes)
        shown = np.zeros(SYNTH_FRAMES, dtype=bool)
        n = rng_silent.integers(4, 11)
        s = rng_silent.integers(0, SYNTH_FRAMES - n + 1)
        shown[s:s + n] = True
        r = S * rng_silent.uniform(0.12, 0.22)
        m = shape_mask(other['shape'], *rng_silent.uniform(r, S - r, 2), r, S)
        hsv = (other['hue'], rng_silent.uniform(0.85, 1), rng_silent.uniform(0.8, 1))
        fill = object_texture(np.array(colorsys.hsv_to_rgb(*hsv)), other['striped'], xx, yy, S)
        silent = (shown, m, fill)
    colour = np.array(colorsys.hsv_to_rgb(sig['hue'], rng.uniform(0.85, 1), rng.uniform(0.8, 1)))
    texture = object_texture(colour, sig['striped'], xx, yy, S)
    radius = S * (0.12 + 0.1 * loud_u)
    cy = S * (0.75 - 0.5 * pitch_u)
    cx = rng.uniform(radius, S - radius)
    drift = rng.uniform(-1.5, 1.5)  # px per frame
    frames, masks = [], []
    for i in range(SYNTH_FRAMES):
        img = background.copy()
        if silent is not None and silent[0][i]:
            img = img * (1 - silent[1]) + silent[2] * silent[1]
        mask = np.zeros((S, S), dtype=bool)
        if on[i]:
            x = np.clip(cx + drift * i, radius, S - radius)
            # drawn even off screen: the same draws
            m = shape_mask(sig['shape'], x, cy + rng.uniform(-1, 1), radius, S)
            if visible[i]:
                img = img * (1 - m) + texture * m
                mask = m[:, :, 0] > 0.5
        img = img + rng.normal(0, 0.02, (S, S, 3))  # pixel noise
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        masks.append(mask)
    meta = dict(cls=c, on=on.astype(int).tolist(), pitch=round(pitch, 2),
                loudness=round(loudness, 4), radius=round(radius, 2), height=round(cy, 2))
    if offscreen > 0:
        meta['visible'] = visible.astype(int).tolist()
    if silent is not None:
        meta['silent_object'] = silent[0].astype(int).tolist()
    if hum_pitch is not None:
        meta['hum_pitch'] = round(hum_pitch, 2)
    return waveform, frames, masks, meta


# synth_clip's defaults
SYNTH_NOISE = dict(on_slots=(5, 10), offscreen=0.0, silent_objects=0.0, clutter=0, hum=0.0)


def make_synthetic(out, num_clips=400, seed=0, num_classes=10, frame_size=96, **noise):
    """Writes DIR/audio/{id}.wav, DIR/frame_{i}/{id}.jpg, DIR/mask_{i}/{id}.png (the sounding
    object's pixels), train.json, eval.json, labels.csv, synth_meta.json (each clip's class and
    on/off pattern, for checks) and synth_config.json (the generator settings). noise:
    synth_clip's semantic-noise options (SYNTH_NOISE holds the defaults)."""
    unknown = set(noise) - set(SYNTH_NOISE)
    if unknown:
        raise ValueError(f"unknown synthetic-data options {sorted(unknown)}; "
                         f"known: {sorted(SYNTH_NOISE)}")
    noise = {**SYNTH_NOISE, **noise}
    lo, hi = noise['on_slots']
    if not 1 <= lo <= hi <= SYNTH_FRAMES:
        raise ValueError(f"on_slots must satisfy 1 <= lo <= hi <= {SYNTH_FRAMES}, "
                         f"got {noise['on_slots']}")
    if noise['silent_objects'] > 0 and num_classes < 2:
        raise ValueError('silent_objects shows an object of another class: '
                         'it needs num_classes >= 2')
    os.makedirs(os.path.join(out, 'audio'), exist_ok=True)
    for i in range(SYNTH_FRAMES):
        os.makedirs(os.path.join(out, f'frame_{i}'), exist_ok=True)
        os.makedirs(os.path.join(out, f'mask_{i}'), exist_ok=True)
    mids = [f'syn_{c}' for c in range(num_classes)]
    with open(os.path.join(out, 'labels.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['index', 'mid', 'display_name'])
        for c in range(num_classes):
            sig = synth_class(c, num_classes)
            name = (f"{'striped ' if sig['striped'] else ''}{sig['shape']} "
                    f"hue {sig['hue'] * 360:.0f}, "
                    f"{sig['pitch']:.0f} Hz x{sig['harmonics']} "
                    f"{'steady' if not sig['tremolo'] else str(sig['tremolo']) + ' Hz'}")
            writer.writerow([c, mids[c], name])
    splits, meta = {'train': [], 'eval': []}, {}
    for number in tqdm(range(num_clips), desc='synth clips'):
        c = number % num_classes  # balanced classes
        clip_id = f'syn{number:05d}'
        waveform, frames, masks, meta[clip_id] = synth_clip(number, c, num_classes, seed,
                                                            frame_size, **noise)
        sf.write(os.path.join(out, 'audio', f'{clip_id}.wav'), waveform, SAMPLE_RATE,
                 subtype='PCM_16')
        for i, (frame, mask) in enumerate(zip(frames, masks)):
            Image.fromarray(frame).save(frame_path(out, i, clip_id), quality=90)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path(out, i, clip_id))
        split = 'eval' if (number // num_classes) % 5 == 4 else 'train'  # every 5th clip per class
        splits[split].append(dict(video_id=clip_id, wav=f'audio/{clip_id}.wav', video_path='.',
                                  labels=mids[c]))
    for split, entries in splits.items():
        with open(os.path.join(out, f'{split}.json'), 'w') as f:
            json.dump({'data': entries}, f, indent=1)
    with open(os.path.join(out, 'synth_meta.json'), 'w') as f:
        json.dump(meta, f)
    with open(os.path.join(out, 'synth_config.json'), 'w') as f:
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in noise.items()}
        json.dump(dict(num_clips=num_clips, seed=seed, num_classes=num_classes,
                       frame_size=frame_size, **settings), f, indent=1)
    print(f"wrote {num_clips} clips ({len(splits['train'])} train, {len(splits['eval'])} eval, "
          f"{num_classes} classes) to {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True)
    parser.add_argument('--num_clips', type=int, default=400)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--frame_size', type=int, default=96, help='JPEG side in pixels')
    parser.add_argument('--on_slots', type=int, nargs=2, default=[5, 10], metavar=('LO', 'HI'),
                        help='semantic noise: "on" slots per clip (of 16); '
                             'fewer = longer silent stretches')
    parser.add_argument('--offscreen', type=float, default=0.0,
                        help="semantic noise: probability that a sound event's object is "
                             "off screen")
    parser.add_argument('--silent_objects', type=float, default=0.0,
                        help='semantic noise: probability that a clip shows an object of '
                             'another class making no sound')
    parser.add_argument('--clutter', type=int, default=0,
                        help='semantic noise: static desaturated background shapes')
    parser.add_argument('--hum', type=float, default=0.0,
                        help='semantic noise: level of a steady off-screen background tone '
                             '(0.05: about the clicks)')
    args = parser.parse_args()
    make_synthetic(args.out, args.num_clips, args.seed, args.num_classes, args.frame_size,
                   on_slots=tuple(args.on_slots), offscreen=args.offscreen,
                   silent_objects=args.silent_objects, clutter=args.clutter, hum=args.hum)


if __name__ == '__main__':
    main()
