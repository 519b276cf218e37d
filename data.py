"""
Data for TG-DP: the CAV-MAE dataset layout -> training / evaluation batches (SPEC section 2),
a built-in synthetic dataset, and raw-video preparation with ffmpeg.

    python data.py synth   --out data_synth --num_clips 400 --seed 0
    python data.py prepare --videos VIDEO_DIR_OR_LIST --out DIR
    python data.py bench   --data data_synth/train.json --workers 2

Layout (CAV-MAE): a JSON {"data": [{"video_id", "wav", "video_path", "labels"}]}, frame i of a clip
at {video_path}/frame_{i}/{video_id}.jpg, labels = comma-separated `mid`s of a CSV with header
index,mid,display_name. Relative paths in a JSON are resolved against the JSON's own folder (the
files written here use them, so a dataset folder can be moved).

Synthetic data (learnable at tiny scale, no single-modality or whole-clip shortcut):
- K classes (default 10). Class c = visual signature (hue c/K, one of 5 shapes, solid or striped)
  + sound signature (pitch 200 Hz * 16^(c/(K-1)), 1/3/6 harmonics, steady or 2/4/8 Hz tremolo).
- Frame i shows the moment t_i = i * 0.64 s, the centre of its fbank segment (SPEC section 2 with
  S=1024 frames = 10.24 s). Time is cut into 16 slots of 0.64 s around the t_i; each clip switches
  on runs of 2-4 slots (5-13 of 16 in all): in "on" slots the class sound plays and the object is
  drawn, in "off" slots the audio is background only and the frame shows no object. So a frame
  and its segment agree on whether (and what) the event is, and the on/off pattern is a per-clip
  fingerprint visible in both modalities (the "diagonal mean" retrieval score sums it over t).
- Instance signals shared across modalities, for clip-to-clip retrieval within a class: pitch
  offset (+-2 semitones) <-> height of the object (higher pitch = higher up), loudness <-> size.
- Distractors (semantic noise, independent of the class): background noise of random level,
  silent stretches, frames with no object, random background tint/gradient, pixel noise, a grey
  distractor shape in ~30% of clips and noise clicks in ~30% of clips; horizontal position and
  drift of the object are random.
- More semantic noise of the kinds TG-DP names (all off by default; `python data.py synth --help`):
  --on_slots LO HI (fewer "on" slots: longer silent stretches), --offscreen P (a sound event whose
  object is off screen), --silent_objects P (a visible object of another class that makes no sound),
  --clutter N (static desaturated background shapes), --hum A (a steady off-screen background tone).
- Held-out split: every 5th clip of each class goes to eval.json (20%, classes balanced in both).
  Every clip draws from its own generator seeded by (seed, clip number): deterministic per seed.
- Object masks: {video_path}/mask_{i}/{video_id}.png, an 8-bit PNG the size of the frame, nonzero =
  the sounding object's pixels (empty when no sounding object is on screen). The same format works
  for real data (draw the boxes or masks of the sounding objects); AVDataset(masks=True) reads them
  and evaluate.py localize scores localisation against them.
"""

import argparse
import colorsys
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image, ImageDraw
from tqdm import tqdm

# -----------------------------------------------------------------------------
# constants (SPEC section 2)

SAMPLE_RATE = 16000
WINDOW = 400  # samples per fbank frame (25 ms)
HOP = 160  # samples between fbank frames (10 ms)
TARGET_FRAMES = 1024  # fbank padded/cut to 1024 frames (10.24 s): S in the segment formula
FBANK_MEAN, FBANK_STD = -5.081, 4.4849  # audio normalisation: (fbank - mean) / std
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# train-mode time shift: at most 0.16 s either way (a quarter of the 0.64 s between frames), so a
# segment still describes the moment of its frame
MAX_TIME_SHIFT = 2560  # samples
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.avi', '.mov', '.flv', '.m4v', '.mpg', '.mpeg')


class ClipError(RuntimeError):
    """A clip's wav or frame is missing or unreadable; the message names the file and the clip."""


# -----------------------------------------------------------------------------
# audio and frame features (pure functions, reused by other scripts)

def segment_bounds(i, num_frames, num_fbank_frames, length):
    """fbank rows [start, end) of the segment aligned with frame i of num_frames (SPEC section 2)."""
    centre = round(i * num_fbank_frames / num_frames)
    start = max(0, centre - length // 2)
    end = start + length
    if end > num_fbank_frames:
        end, start = num_fbank_frames, max(0, num_fbank_frames - length)
    return start, end


def mono_16k(waveform, sample_rate):
    """(N,) or (C, N) waveform at any rate -> (N',) first channel at 16 kHz, mean removed."""
    waveform = torch.as_tensor(waveform, dtype=torch.float32)
    if waveform.ndim == 2:
        waveform = waveform[0]  # first channel, as the reference pipeline (kaldi channel 0)
    if sample_rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, sample_rate, SAMPLE_RATE)
    return waveform - waveform.mean()


def fbank_rows(read, num_samples, num_mel_bins, start=0, end=TARGET_FRAMES):
    """Rows [start, end) of the zero-padded kaldi fbank of a mono 16 kHz waveform of num_samples
    samples, where read(a, b) returns its samples [a, b). Kaldi frame k reads only samples
    [k*HOP, k*HOP + WINDOW) (snip_edges, per-frame DC removal and pre-emphasis), so computing just
    the samples the rows need gives the full result (same arithmetic per row; only float32 rounding
    of the batched FFT may differ, ~1e-5 relative)."""
    num_available = 0 if num_samples < WINDOW else 1 + (num_samples - WINDOW) // HOP
    last = min(end, num_available)
    fbank = torch.zeros(end - start, num_mel_bins)  # (end - start, F); rows past the audio stay 0
    if last > start:
        chunk = read(start * HOP, (last - 1) * HOP + WINDOW)
        fbank[:last - start] = torchaudio.compliance.kaldi.fbank(
            chunk[None], htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
            window_type='hanning', num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)
    return fbank


def fbank_frames(waveform, num_mel_bins, start=0, end=TARGET_FRAMES):
    """Rows [start, end) of the fbank of a mono 16 kHz mean-removed waveform (N,) in memory."""
    return fbank_rows(lambda a, b: waveform[a:b], len(waveform), num_mel_bins, start, end)


def wav_to_fbank(waveform, sample_rate, num_mel_bins=128):
    """(N,) or (C, N) waveform -> (1024, F) un-normalised log-mel fbank, zero-padded or cut."""
    return fbank_frames(mono_16k(waveform, sample_rate), num_mel_bins)


def load_waveform(path, clip_id):
    """wav file -> (N,) float32 first channel at 16 kHz, mean removed."""
    if not os.path.isfile(path):
        raise ClipError(f"clip '{clip_id}': wav file not found: {path}")
    try:
        samples, sample_rate = sf.read(path, dtype='float32', always_2d=True)  # (N, C)
    except Exception as e:
        raise ClipError(f"clip '{clip_id}': cannot read wav file {path}: {e}") from e
    if len(samples) == 0:
        raise ClipError(f"clip '{clip_id}': wav file has no samples: {path}")
    return mono_16k(torch.from_numpy(samples[:, 0]), sample_rate)


def load_segment_fbank(path, clip_id, num_mel_bins, start, end, shift=0):
    """fbank rows [start, end) of a wav rolled by shift samples (torch.roll: the train-time shift),
    reading only the samples those rows need from a 16 kHz file (4.2 s of a 10 s clip for 416 rows;
    a roll that wraps reads two pieces); other rates are read whole and resampled. The clip mean is
    not removed: kaldi's per-frame DC removal cancels any constant offset, so the rows equal those of
    load_waveform's mean-removed waveform (to float32 rounding)."""
    if not os.path.isfile(path):
        raise ClipError(f"clip '{clip_id}': wav file not found: {path}")
    try:
        f = sf.SoundFile(path)
    except Exception as e:
        raise ClipError(f"clip '{clip_id}': cannot read wav file {path}: {e}") from e
    with f:
        num_samples = f.frames
        if num_samples == 0:
            raise ClipError(f"clip '{clip_id}': wav file has no samples: {path}")
        if f.samplerate != SAMPLE_RATE:
            waveform = torch.roll(load_waveform(path, clip_id), shift)
            return fbank_frames(waveform, num_mel_bins, start, end)

        def read(a, b):  # samples [a, b) of the rolled waveform: source samples from (a - shift) mod N on
            src, pieces = (a - shift) % num_samples, []
            try:
                f.seek(src)
                pieces.append(f.read(min(b - a, num_samples - src), dtype='float32', always_2d=True)[:, 0])
                if b - a > num_samples - src:  # the roll wrapped: the rest from the start of the file
                    f.seek(0)
                    pieces.append(f.read(b - a - len(pieces[0]), dtype='float32', always_2d=True)[:, 0])
            except Exception as e:
                raise ClipError(f"clip '{clip_id}': cannot read wav file {path}: {e}") from e
            samples = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            if len(samples) != b - a:
                raise ClipError(f"clip '{clip_id}': wav file ends before the {num_samples} samples "
                                f"its header declares: {path}")
            return torch.from_numpy(samples)
        return fbank_rows(read, num_samples, num_mel_bins, start, end)


def load_frame(path, img_size, clip_id='', draft=False):
    """JPEG -> (3, img_size, img_size): shorter side to img_size (bicubic), centre crop, normalised.
    Sizes are computed as torchvision's Resize/CenterCrop do, as in the reference pipeline.
    draft: let the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding when the result still covers
    the target size: a 1280x720 frame loads 2.4x faster, within 0.75 of 255 levels on average of the
    full decode (measured on a sample video); no effect on frames prepared at 224 px."""
    if not os.path.isfile(path):
        raise ClipError(f"clip '{clip_id}': frame file not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w <= h:
                new_w, new_h = img_size, int(img_size * h / w)
            else:
                new_w, new_h = int(img_size * w / h), img_size
            if draft:
                img.draft('RGB', (new_w, new_h))
            img = img.convert('RGB')
    except Exception as e:
        raise ClipError(f"clip '{clip_id}': cannot read frame file {path}: {e}") from e
    img = img.resize((new_w, new_h), Image.BICUBIC)  # a no-op copy when already that size
    left, top = int(round((new_w - img_size) / 2.0)), int(round((new_h - img_size) / 2.0))
    img = img.crop((left, top, left + img_size, top + img_size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()  # (3, H, W) in 0..255 (np.array: writable uint8)
    scale = 255.0 * torch.tensor(IMAGE_STD)[:, None, None]
    return x.sub_(255.0 * torch.tensor(IMAGE_MEAN)[:, None, None]).div_(scale)  # in place: no more copies


def frame_path(video_path, i, clip_id):
    return os.path.join(video_path, f'frame_{i}', f'{clip_id}.jpg')


def mask_path(video_path, i, clip_id):
    """Object mask of frame i: an 8-bit PNG the size of the frame file, nonzero = sounding object."""
    return os.path.join(video_path, f'mask_{i}', f'{clip_id}.png')


def load_mask(path, img_size, clip_id=''):
    """Mask PNG -> (img_size, img_size) bool, with load_frame's geometry (shorter side to img_size,
    centre crop; nearest-neighbour resampling so that it stays binary)."""
    try:
        with Image.open(path) as img:
            img = img.convert('L')
    except Exception as e:
        raise ClipError(f"clip '{clip_id}': cannot read mask file {path}: {e}") from e
    w, h = img.size
    new_w, new_h = (img_size, int(img_size * h / w)) if w <= h else (int(img_size * w / h), img_size)
    img = img.resize((new_w, new_h), Image.NEAREST)
    left, top = int(round((new_w - img_size) / 2.0)), int(round((new_h - img_size) / 2.0))
    return torch.from_numpy(np.array(img.crop((left, top, left + img_size, top + img_size))) > 0)


# -----------------------------------------------------------------------------
# dataset

def read_label_csv(label_csv):
    """CSV index,mid,display_name -> (dict mid -> index, list of display names)."""
    with open(label_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or not {'index', 'mid', 'display_name'} <= set(rows[0]):
        raise ValueError(f"{label_csv}: expected a header 'index,mid,display_name' and >= 1 row")
    mid_to_index = {row['mid']: int(row['index']) for row in rows}
    if sorted(mid_to_index.values()) != list(range(len(rows))):
        raise ValueError(f"{label_csv}: the index column must be 0..{len(rows) - 1}, each once")
    names = [''] * len(rows)
    for row in rows:
        names[int(row['index'])] = row['display_name']
    return mid_to_index, names


class AVDataset(torch.utils.data.Dataset):
    """CAV-MAE JSON (+ optional label CSV) -> items (SPEC section 2):
    train: audio (L, F), image (3, H, W), frame (int, drawn per (seed, epoch, index)), label, id
    eval:  audio (T, L, F), image (T, 3, H, W), label, id  (one fbank per clip, T segments)
    label: float32 multi-hot (num_classes,), length 0 without a label CSV.
    masks=True adds mask (T, H, W) / (H, W) bool (the sounding object's pixels, from
    {video_path}/mask_{i}/{video_id}.png, see mask_path) and has_mask (T,) / () bool: False where a
    frame has no mask file (its mask is then all False).
    audio_length, num_mel_bins, img_size come from the model config; time_shift acts in train mode
    only. skip_bad=True checks every file at start-up, drops clips with a missing or unreadable
    wav/frame, prints the count and writes their ids to bad_list (default: next to the JSON,
    <json name>.bad.txt); otherwise such a clip raises ClipError when loaded."""

    def __init__(self, data_json, label_csv=None, mode='train', audio_length=416,
                 num_mel_bins=128, img_size=224, num_frames=16, time_shift=False, seed=0,
                 skip_bad=False, bad_list=None, masks=False):
        if mode not in ('train', 'eval'):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 < audio_length <= TARGET_FRAMES:
            raise ValueError(f"audio_length must be in 1..{TARGET_FRAMES}, got {audio_length}")
        self.mode, self.audio_length, self.num_mel_bins = mode, audio_length, num_mel_bins
        self.img_size, self.num_frames = img_size, num_frames
        self.time_shift, self.seed, self.epoch = time_shift, seed, 0
        self.masks = masks

        with open(data_json) as f:
            entries = json.load(f)['data']
        if not entries:
            raise ValueError(f"{data_json} lists no clips")
        root = os.path.dirname(os.path.abspath(data_json))
        mid_to_index, self.class_names = read_label_csv(label_csv) if label_csv else ({}, [])
        self.num_classes = len(self.class_names)

        self.clips = []  # dicts: id, wav, video_path, label (num_classes,)
        for n, entry in enumerate(entries):
            missing = {'video_id', 'wav', 'video_path'} - set(entry)
            if missing:
                raise ValueError(f"{data_json}: entry {n} lacks {sorted(missing)}")
            clip_id = entry['video_id']
            label = torch.zeros(self.num_classes)
            if label_csv:
                mids = [m.strip() for m in entry.get('labels', '').split(',') if m.strip()]
                unknown = [m for m in mids if m not in mid_to_index]
                if not mids or unknown:
                    problem = f"unknown label ids {unknown}" if unknown else "no labels"
                    raise ValueError(f"{data_json}: clip '{clip_id}' has {problem} "
                                     f"(label CSV {label_csv})")
                label[[mid_to_index[m] for m in mids]] = 1.0
            self.clips.append(dict(id=clip_id, label=label,
                                   wav=os.path.join(root, entry['wav']),
                                   video_path=os.path.join(root, entry['video_path'])))
        if skip_bad:
            self._drop_bad_clips(data_json, bad_list)

    def _drop_bad_clips(self, data_json, bad_list):
        """Check every wav and frame header now; drop clips with a missing or unreadable file.
        (A file whose header reads but whose data is truncated still raises when loaded.)"""
        bad_list = bad_list or os.path.splitext(data_json)[0] + '.bad.txt'
        good, bad = [], []
        for clip in tqdm(self.clips, desc='checking clips', leave=False):
            try:
                if not os.path.isfile(clip['wav']) or sf.info(clip['wav']).frames == 0:
                    raise ClipError('missing or empty wav')
                for i in range(self.num_frames):
                    with Image.open(frame_path(clip['video_path'], i, clip['id'])):
                        pass
                good.append(clip)
            except Exception:
                bad.append(clip['id'])
        with open(bad_list, 'w') as f:
            f.writelines(clip_id + '\n' for clip_id in bad)
        print(f"AVDataset: skipped {len(bad)} of {len(self.clips)} clips of {data_json} with a "
              f"missing or unreadable wav/frame (ids in {bad_list})")
        if not good:
            raise ValueError(f"{data_json}: every clip has a missing or unreadable file")
        self.clips = good

    def set_epoch(self, epoch):
        """Changes the train-mode draws (call before iterating; persistent workers keep a copy)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        clip = self.clips[index]
        T, L = self.num_frames, self.audio_length
        item = dict(label=clip['label'], id=clip['id'])
        if self.mode == 'train':
            # a pure function of (seed, epoch, index): independent of workers, exact on resume
            rng = np.random.default_rng((self.seed, self.epoch, index))
            frame = int(rng.integers(T))
            shift = int(rng.integers(-MAX_TIME_SHIFT, MAX_TIME_SHIFT + 1)) if self.time_shift else 0
            start, end = segment_bounds(frame, T, TARGET_FRAMES, L)
            audio = load_segment_fbank(clip['wav'], clip['id'], self.num_mel_bins, start, end, shift)  # (L, F)
            # JPEG draft decoding for training only: evaluation decodes in full, as the reference pipeline
            image = load_frame(frame_path(clip['video_path'], frame, clip['id']), self.img_size, clip['id'], draft=True)
            item['frame'] = frame
        else:
            fbank = fbank_frames(load_waveform(clip['wav'], clip['id']), self.num_mel_bins)  # (1024, F), once per clip
            audio = torch.stack([fbank[slice(*segment_bounds(i, T, TARGET_FRAMES, L))]
                                 for i in range(T)])  # (T, L, F)
            image = torch.stack([load_frame(frame_path(clip['video_path'], i, clip['id']),
                                            self.img_size, clip['id']) for i in range(T)])  # (T, 3, H, W)
        item['audio'] = (audio - FBANK_MEAN) / FBANK_STD
        item['image'] = image
        if self.masks:
            frames = [item['frame']] if self.mode == 'train' else range(T)
            paths = [mask_path(clip['video_path'], i, clip['id']) for i in frames]
            has = torch.tensor([os.path.isfile(p) for p in paths])  # (T,)
            mask = torch.stack([load_mask(p, self.img_size, clip['id']) if ok else
                                torch.zeros(self.img_size, self.img_size, dtype=torch.bool) for p, ok in zip(paths, has)])
            item['mask'], item['has_mask'] = (mask[0], has[0]) if self.mode == 'train' else (mask, has)
        return item


def collate(items):
    """list of items -> batch: audio/image/label (and mask/has_mask) stacked (B, ...), frame (B,) int64, id list."""
    batch = {key: torch.stack([item[key] for item in items]) for key in ('audio', 'image', 'label')}
    batch['id'] = [item['id'] for item in items]
    if 'mask' in items[0]:
        batch['mask'] = torch.stack([item['mask'] for item in items])
        batch['has_mask'] = torch.stack([item['has_mask'] for item in items])
    if 'frame' in items[0]:
        batch['frame'] = torch.tensor([item['frame'] for item in items])
    return batch


# -----------------------------------------------------------------------------
# synthetic clips (design in the module docstring)

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
      on_slots        (lo, hi): a clip aims at lo..hi "on" slots of 16; fewer = longer silent stretches
      offscreen       probability that a run of "on" slots is heard but its object is off screen
      silent_objects  probability that the clip shows an object of another class that makes no sound
      clutter         number of static, desaturated shapes in the background (uninformative patches)
      hum             level of a steady background tone at a random pitch from an off-screen source"""
    rng = np.random.default_rng((seed, number))
    sig = synth_class(c, num_classes)
    # which of the 16 slots show/sound the object: runs of 2-4 slots, on_slots[0]..on_slots[1] (+3) in all
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
        waveform = waveform + hum * rng_hum.uniform(0.5, 1) * harmonic_tone(hum_pitch, 2, t, rng_hum)
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
            hue, sat, val = rng_clutter.uniform(), rng_clutter.uniform(0.1, 0.3), rng_clutter.uniform(0.3, 0.8)
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
        silent = (shown, m, object_texture(np.array(colorsys.hsv_to_rgb(*hsv)), other['striped'], xx, yy, S))
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
            m = shape_mask(sig['shape'], x, cy + rng.uniform(-1, 1), radius, S)  # drawn even off screen: same draws
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


SYNTH_NOISE = dict(on_slots=(5, 10), offscreen=0.0, silent_objects=0.0, clutter=0, hum=0.0)  # synth_clip's defaults


def make_synthetic(out, num_clips=400, seed=0, num_classes=10, frame_size=96, **noise):
    """Writes DIR/audio/{id}.wav, DIR/frame_{i}/{id}.jpg, DIR/mask_{i}/{id}.png (the sounding object's
    pixels), train.json, eval.json, labels.csv, synth_meta.json (each clip's class and on/off pattern,
    for checks) and synth_config.json (the generator settings). noise: synth_clip's semantic-noise
    options (SYNTH_NOISE holds the defaults)."""
    unknown = set(noise) - set(SYNTH_NOISE)
    if unknown:
        raise ValueError(f"unknown synthetic-data options {sorted(unknown)}; known: {sorted(SYNTH_NOISE)}")
    noise = {**SYNTH_NOISE, **noise}
    lo, hi = noise['on_slots']
    if not 1 <= lo <= hi <= SYNTH_FRAMES:
        raise ValueError(f"on_slots must satisfy 1 <= lo <= hi <= {SYNTH_FRAMES}, got {noise['on_slots']}")
    if noise['silent_objects'] > 0 and num_classes < 2:
        raise ValueError('silent_objects shows an object of another class: it needs num_classes >= 2')
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
            name = (f"{'striped ' if sig['striped'] else ''}{sig['shape']} hue {sig['hue'] * 360:.0f}, "
                    f"{sig['pitch']:.0f} Hz x{sig['harmonics']} "
                    f"{'steady' if not sig['tremolo'] else str(sig['tremolo']) + ' Hz'}")
            writer.writerow([c, mids[c], name])
    splits, meta = {'train': [], 'eval': []}, {}
    for number in tqdm(range(num_clips), desc='synth clips'):
        c = number % num_classes  # balanced classes
        clip_id = f'syn{number:05d}'
        waveform, frames, masks, meta[clip_id] = synth_clip(number, c, num_classes, seed, frame_size, **noise)
        sf.write(os.path.join(out, 'audio', f'{clip_id}.wav'), waveform, SAMPLE_RATE, subtype='PCM_16')
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
        json.dump(dict(num_clips=num_clips, seed=seed, num_classes=num_classes, frame_size=frame_size,
                       **{k: list(v) if isinstance(v, tuple) else v for k, v in noise.items()}), f, indent=1)
    print(f"wrote {num_clips} clips ({len(splits['train'])} train, {len(splits['eval'])} eval, "
          f"{num_classes} classes) to {out}")


# -----------------------------------------------------------------------------
# raw-video preparation with ffmpeg

def list_videos(videos):
    """A directory (its video files) or a text file of paths, one a line, relative ones taken from
    the current directory ('#' starts a comment line) -> list of paths."""
    if os.path.isdir(videos):
        return sorted(os.path.join(videos, name) for name in os.listdir(videos)
                      if name.lower().endswith(VIDEO_EXTENSIONS))
    with open(videos) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


def prepare_video(ffmpeg, video, out, num_frames=16, short_side=224):
    """One video -> OUT/audio/{id}.wav (16 kHz, first channel) and OUT/frame_{i}/{id}.jpg.
    Frames: ffmpeg's fps filter at num_frames/10 fps over the first 10 s, so frame i is the video
    frame shown at about t = i * 10 / num_frames s. Frames are scaled down (bicubic) so that the
    shorter side is at most short_side (0: keep). Files appear atomically (tmp + rename), so an
    interrupted run never leaves a clip that looks done. Raises RuntimeError with ffmpeg's message."""
    clip_id = os.path.splitext(os.path.basename(video))[0]
    tmp = os.path.join(out, '.tmp', clip_id)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def run(args):
        result = subprocess.run([ffmpeg, '-nostdin', '-v', 'error', '-y', *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-500:] or f'ffmpeg exit code {result.returncode}')

    try:
        scale = ''
        if short_side:
            scale = (f",scale=w='if(lte(iw,ih),min(iw,{short_side}),-2)'"
                     f":h='if(lte(iw,ih),-2,min(ih,{short_side}))':flags=bicubic")
        run(['-t', '10', '-i', video, '-vf', f'fps={num_frames}/10{scale}', '-frames:v', str(num_frames),
             '-q:v', '2', os.path.join(tmp, '%02d.jpg')])
        got = len([n for n in os.listdir(tmp) if n.endswith('.jpg')])
        if got < num_frames:
            raise RuntimeError(f'only {got} of {num_frames} frames in the first 10 s (video too short?)')
        run(['-i', video, '-map', '0:a:0', '-af', 'pan=mono|c0=c0', '-ar', str(SAMPLE_RATE),
             '-c:a', 'pcm_s16le', os.path.join(tmp, 'audio.wav')])
        for i in range(num_frames):  # ffmpeg numbers from 1
            os.replace(os.path.join(tmp, f'{i + 1:02d}.jpg'), frame_path(out, i, clip_id))
        os.replace(os.path.join(tmp, 'audio.wav'), os.path.join(out, 'audio', f'{clip_id}.wav'))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(videos, out, num_frames=16, short_side=224, workers=1):
    """Raw videos -> CAV-MAE layout in OUT and OUT/data.json (clip id = file stem, labels empty).
    Resumable: clips whose wav and frames exist are skipped. Returns {video: error} of failures."""
    ffmpeg = shutil.which('ffmpeg')
    if ffmpeg is None:
        raise RuntimeError("ffmpeg not found on PATH: `prepare` needs the ffmpeg command-line tool "
                           "(e.g. apt-get install ffmpeg)")
    paths = list_videos(videos)
    ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{videos}: several videos share the clip id(s) {duplicates[:5]} (file stem)")
    os.makedirs(os.path.join(out, 'audio'), exist_ok=True)
    for i in range(num_frames):
        os.makedirs(os.path.join(out, f'frame_{i}'), exist_ok=True)

    def done(clip_id):
        return (os.path.isfile(os.path.join(out, 'audio', f'{clip_id}.wav')) and
                all(os.path.isfile(frame_path(out, i, clip_id)) for i in range(num_frames)))

    todo = [p for p, i in zip(paths, ids) if not done(i)]
    print(f"{len(paths)} videos: {len(paths) - len(todo)} already done, {len(todo)} to prepare")
    failures = {}

    def work(video):
        try:
            prepare_video(ffmpeg, video, out, num_frames, short_side)
        except Exception as e:
            failures[video] = str(e)

    with ThreadPoolExecutor(workers) as pool:  # ffmpeg does the work, threads only wait
        list(tqdm(pool.map(work, todo), total=len(todo), desc='prepare'))
    shutil.rmtree(os.path.join(out, '.tmp'), ignore_errors=True)
    entries = [dict(video_id=i, wav=f'audio/{i}.wav', video_path='.', labels='') for i in ids if done(i)]
    with open(os.path.join(out, 'data.json'), 'w') as f:
        json.dump({'data': entries}, f, indent=1)
    print(f"wrote {os.path.join(out, 'data.json')} with {len(entries)} clips")
    if failures:
        print(f"{len(failures)} videos failed:")
        for video, error in failures.items():
            print(f"  {video}: {error}")
    return failures


# -----------------------------------------------------------------------------
# loader benchmark

def bench(data_json, workers=0, img_size=224, audio_length=416, num_mel_bins=128,
          batch_size=32, num_batches=10):
    """Prints training items/s (total and per worker) through a DataLoader."""
    dataset = AVDataset(data_json, mode='train', audio_length=audio_length,
                        num_mel_bins=num_mel_bins, img_size=img_size, time_shift=True)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=batch_size * (num_batches + 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=collate)
    batches = iter(loader)
    next(batches)  # warm-up: worker start, file cache
    t0 = time.perf_counter()
    n = sum(len(batch['id']) for batch in batches)
    per_second = n / (time.perf_counter() - t0)
    print(f"{per_second:.1f} items/s, {per_second / max(1, workers):.1f} items/s per worker "
          f"({workers} workers, img_size {img_size}, audio_length {audio_length}, {n} items)")
    return per_second


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('synth', help='write the synthetic dataset')
    p.add_argument('--out', required=True)
    p.add_argument('--num_clips', type=int, default=400)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num_classes', type=int, default=10)
    p.add_argument('--frame_size', type=int, default=96, help='JPEG side in pixels')
    p.add_argument('--on_slots', type=int, nargs=2, default=[5, 10], metavar=('LO', 'HI'),
                   help='semantic noise: "on" slots per clip (of 16); fewer = longer silent stretches')
    p.add_argument('--offscreen', type=float, default=0.0,
                   help='semantic noise: probability that a sound event\'s object is off screen')
    p.add_argument('--silent_objects', type=float, default=0.0,
                   help='semantic noise: probability that a clip shows an object of another class making no sound')
    p.add_argument('--clutter', type=int, default=0, help='semantic noise: static desaturated background shapes')
    p.add_argument('--hum', type=float, default=0.0,
                   help='semantic noise: level of a steady off-screen background tone (0.05: about the clicks)')
    p = sub.add_parser('prepare', help='raw videos -> CAV-MAE layout with ffmpeg')
    p.add_argument('--videos', required=True, help='a directory of videos or a text file of paths')
    p.add_argument('--out', required=True)
    p.add_argument('--num_frames', type=int, default=16)
    p.add_argument('--short_side', type=int, default=224, help='scale frames down to this (0: keep)')
    p.add_argument('--workers', type=int, default=1, help='ffmpeg processes at a time')
    p = sub.add_parser('bench', help='data-loader throughput')
    p.add_argument('--data', required=True, help='dataset JSON')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--audio_length', type=int, default=416)
    p.add_argument('--num_mel_bins', type=int, default=128)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--num_batches', type=int, default=10)
    args = parser.parse_args()

    if args.command == 'synth':
        make_synthetic(args.out, args.num_clips, args.seed, args.num_classes, args.frame_size,
                       on_slots=tuple(args.on_slots), offscreen=args.offscreen, silent_objects=args.silent_objects,
                       clutter=args.clutter, hum=args.hum)
    elif args.command == 'prepare':
        sys.exit(1 if prepare(args.videos, args.out, args.num_frames, args.short_side, args.workers) else 0)
    else:
        bench(args.data, args.workers, args.img_size, args.audio_length, args.num_mel_bins,
              args.batch_size, args.num_batches)
