"""
Data for TG-DP: the CAV-MAE dataset layout -> training / evaluation batches (CAV-MAE Sync's input pipeline),
a built-in synthetic dataset, raw-video preparation with ffmpeg, labelled splits from the official
AudioSet / VGGSound metadata, and tar shards (webdataset convention) with a training stream.

    python data.py synth    --out data_synth --num_clips 400 --seed 0
    python data.py prepare  --videos VIDEO_DIR_OR_LIST --out DIR
    python data.py audioset --prepared DIR --label_csv class_labels_indices.csv --out DIR --balanced CSV ...
    python data.py vggsound --prepared DIR --csv vggsound.csv --label_csv CLASSES_CSV --out DIR
    python data.py subset   --data SPLIT_JSON (--ids IDS_TXT | --template TEMPLATE_JSON) --out JSON
    python data.py shard    --data JSON --out SHARD_DIR [--shard_size 1000]
    python data.py bench    --data data_synth/train.json --workers 2

Layout (CAV-MAE): a JSON {"data": [{"video_id", "wav", "video_path", "labels"}]}, frame i of a clip
at {video_path}/frame_{i}/{video_id}.jpg, labels = comma-separated `mid`s of a CSV with header
index,mid,display_name. Relative paths in a JSON are resolved against the JSON's own folder (the
files written here use them, so a dataset folder can be moved).

Synthetic data (learnable at tiny scale, no single-modality or whole-clip shortcut):
- K classes (default 10). Class c = visual signature (hue c/K, one of 5 shapes, solid or striped)
  + sound signature (pitch 200 Hz * 16^(c/(K-1)), 1/3/6 harmonics, steady or 2/4/8 Hz tremolo).
- Frame i shows the moment t_i = i * 0.64 s, the centre of its fbank segment (segment_bounds with
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
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image, ImageDraw
from tqdm import tqdm

# -----------------------------------------------------------------------------
# constants (the CAV-MAE / CAV-MAE Sync releases' preprocessing)

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
    """fbank rows [start, end) of the segment aligned with frame i of num_frames (CAV-MAE Sync's
    frame-aligned segments)."""
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
    """wav file (a path or a ShardMember) -> (N,) float32 first channel at 16 kHz, mean removed."""
    if isinstance(path, str) and not os.path.isfile(path):
        raise ClipError(f"clip '{clip_id}': wav file not found: {path}")
    try:
        if not isinstance(path, str):
            path.seek(0)
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
    load_waveform's mean-removed waveform (to float32 rounding). path: a file or a ShardMember."""
    if isinstance(path, str) and not os.path.isfile(path):
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


def resized_size(w, h, img_size):
    """(width, height) with the shorter side at img_size, as torchvision's Resize computes it."""
    return (img_size, int(img_size * h / w)) if w <= h else (int(img_size * w / h), img_size)


def resize_centre_crop(img, size, img_size, resample):
    """PIL image -> resized to size (resized_size), then the centre (img_size, img_size) as CenterCrop."""
    img = img.resize(size, resample)  # a no-op copy when already that size
    left, top = int(round((size[0] - img_size) / 2.0)), int(round((size[1] - img_size) / 2.0))
    return img.crop((left, top, left + img_size, top + img_size))


def load_frame(path, img_size, clip_id='', draft=False):
    """JPEG -> (3, img_size, img_size): shorter side to img_size (bicubic), centre crop, normalised.
    Sizes are computed as torchvision's Resize/CenterCrop do, as in the reference pipeline.
    draft: let the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding when the result still covers
    the target size: a 1280x720 frame loads 2.4x faster, within 0.75 of 255 levels on average of the
    full decode (measured on a sample video); no effect on frames prepared at 224 px.
    path: a file or a ShardMember."""
    if isinstance(path, str) and not os.path.isfile(path):
        raise ClipError(f"clip '{clip_id}': frame file not found: {path}")
    try:
        with Image.open(path if isinstance(path, str) else io.BytesIO(path.readall())) as img:
            size = resized_size(*img.size, img_size)  # of the full frame, also when draft decodes it smaller
            if draft:
                img.draft('RGB', size)
            img = img.convert('RGB')
    except Exception as e:
        raise ClipError(f"clip '{clip_id}': cannot read frame file {path}: {e}") from e
    img = resize_centre_crop(img, size, img_size, Image.BICUBIC)
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
    img = resize_centre_crop(img, resized_size(*img.size, img_size), img_size, Image.NEAREST)
    return torch.from_numpy(np.array(img) > 0)


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


def label_indices(labels, mid_to_index, where, clip_id, require_labels=False):
    """'mid1,mid2' -> sorted class indices; [] without a label CSV (empty mid_to_index). A clip keeps its
    indices, not a multi-hot vector: 2 M AudioSet clips x 527 classes would be 4 GB of float32."""
    if not mid_to_index:
        return []
    mids = [m.strip() for m in labels.split(',') if m.strip()]
    unknown = [m for m in mids if m not in mid_to_index]
    if unknown or (require_labels and not mids):
        problem = f"unknown label ids {unknown}" if unknown else "no labels"
        raise ValueError(f"{where}: clip '{clip_id}' has {problem}")
    return sorted({mid_to_index[m] for m in mids})


def multi_hot(indices, num_classes):
    """class indices -> float32 multi-hot (num_classes,); no indices give zeros."""
    label = torch.zeros(num_classes)
    label[indices] = 1.0
    return label


def read_clip_table(spec):
    """A dataset JSON or a shard set -> list of dicts: id, index, labels, and either wav + video_path
    (files) or tar + offset + end (a clip's members in a shard). index is the clip's position in the
    JSON (for shards: in the JSON they were packed from); the table is in index order."""
    if is_shard_set(spec):
        clips = [dict(id=c[1], labels=c[2], index=c[3], tar=path, offset=c[4], end=c[5])
                 for path, table in shard_tables(spec) for c in table]
        return sorted(clips, key=lambda c: c['index'])
    with open(spec) as f:
        entries = json.load(f)['data']
    root = os.path.dirname(os.path.abspath(spec))
    clips = []
    for n, entry in enumerate(entries):
        missing = {'video_id', 'wav', 'video_path'} - set(entry)
        if missing:
            raise ValueError(f"{spec}: entry {n} lacks {sorted(missing)}")
        clips.append(dict(id=entry['video_id'], labels=entry.get('labels', ''), index=n,
                          wav=os.path.join(root, entry['wav']), video_path=os.path.join(root, entry['video_path'])))
    return clips


def clip_wav(clip):
    """The clip's audio: a path, or a ShardMember (its key.wav or key.flac)."""
    if 'tar' not in clip:
        return clip['wav']
    members = clip_members(clip)
    for ext in ('wav', 'flac'):
        if ext in members:
            return members[ext]
    raise ClipError(f"clip '{clip['id']}': no wav or flac member in {clip['tar']} at byte {clip['offset']}")


def clip_frame(clip, i):
    """Frame i of the clip: a path, or a ShardMember (key.frame_{i:02d}.jpg)."""
    if 'tar' not in clip:
        return frame_path(clip['video_path'], i, clip['id'])
    member = clip_members(clip).get(f'frame_{i:02d}.jpg')
    if member is None:
        raise ClipError(f"clip '{clip['id']}': frame member frame_{i:02d}.jpg not found in {clip['tar']}")
    return member


def check_clip(clip, num_frames):
    """None, or why the clip's wav or one of its frames cannot be opened (headers only)."""
    try:
        wav = clip_wav(clip)
        if isinstance(wav, str) and not os.path.isfile(wav):
            return f'wav file not found: {wav}'
        try:
            if sf.info(wav).frames == 0:
                return f'wav file has no samples: {wav}'
        except Exception as e:
            return f'cannot read wav file {wav}: {e}'
        for i in range(num_frames):
            frame = clip_frame(clip, i)
            if isinstance(frame, str) and not os.path.isfile(frame):
                return f'frame file not found: {frame}'
            try:
                with Image.open(frame if isinstance(frame, str) else io.BytesIO(frame.readall())) as img:
                    img.size
            except Exception as e:
                return f'cannot read frame file {frame}: {e}'
    except ClipError as e:  # a shard clip without a wav or frame member
        return str(e)
    return None


def load_item(clip, mode, epoch, seed, audio_length, num_mel_bins, img_size, num_frames, time_shift):
    """One clip (a row of read_clip_table) -> the dataset item (AVDataset's docstring) without its label.
    Train mode draws the frame and the time shift from (seed, epoch, clip index): a pure function, so
    the same clip gives the same item from files or shards, in any worker, rank, or order."""
    T, L = num_frames, audio_length
    if 'tar' in clip and 'members' not in clip:  # read the headers once per item
        clip = dict(clip, members=tar_members(clip['tar'], clip['offset'], clip['end']))
    item = dict(id=clip['id'])
    if mode == 'train':
        rng = np.random.default_rng((seed, epoch, clip['index']))
        frame = int(rng.integers(T))
        shift = int(rng.integers(-MAX_TIME_SHIFT, MAX_TIME_SHIFT + 1)) if time_shift else 0
        start, end = segment_bounds(frame, T, TARGET_FRAMES, L)
        audio = load_segment_fbank(clip_wav(clip), clip['id'], num_mel_bins, start, end, shift)  # (L, F)
        # JPEG draft decoding for training only: evaluation decodes in full, as the reference pipeline
        image = load_frame(clip_frame(clip, frame), img_size, clip['id'], draft=True)
        item['frame'] = frame
    else:
        fbank = fbank_frames(load_waveform(clip_wav(clip), clip['id']), num_mel_bins)  # (1024, F), once per clip
        audio = torch.stack([fbank[slice(*segment_bounds(i, T, TARGET_FRAMES, L))]
                             for i in range(T)])  # (T, L, F)
        image = torch.stack([load_frame(clip_frame(clip, i), img_size, clip['id']) for i in range(T)])  # (T, 3, H, W)
    item['audio'] = (audio - FBANK_MEAN) / FBANK_STD
    item['image'] = image
    return item


class AVDataset(torch.utils.data.Dataset):
    """CAV-MAE JSON or a shard set (+ optional label CSV) -> items (the CAV-MAE Sync input pipeline):
    train: audio (L, F), image (3, H, W), frame (int, drawn per (seed, epoch, clip index)), label, id
    eval:  audio (T, L, F), image (T, 3, H, W), label, id  (one fbank per clip, T segments)
    data_json: a dataset JSON, or shards written by `data.py shard` (their folder, their index.json,
    a brace pattern 'DIR/shards-{00000..00012}.tar' or one .tar); shard members are read by byte
    offset, and the items equal those of the JSON the shards were packed from (same order).
    label: float32 multi-hot (num_classes,), length 0 without a label CSV. A clip with no labels gets
    an all-zero label unless require_labels (probing needs labels, pretraining does not); label ids
    that are not in the CSV are always an error (a wrong CSV).
    masks=True adds mask (T, H, W) / (H, W) bool (the sounding object's pixels, from
    {video_path}/mask_{i}/{video_id}.png, see mask_path) and has_mask (T,) / () bool: False where a
    frame has no mask file (its mask is then all False). JSON datasets only.
    audio_length, num_mel_bins, img_size come from the model config; time_shift acts in train mode
    only. skip_bad=True checks every file at start-up, drops clips with a missing or unreadable
    wav/frame, prints the count and writes their ids to bad_list (default: next to the JSON,
    <json name>.bad.txt; '' writes and prints nothing); otherwise such a clip raises ClipError when
    loaded."""

    def __init__(self, data_json, label_csv=None, mode='train', audio_length=416,
                 num_mel_bins=128, img_size=224, num_frames=16, time_shift=False, seed=0,
                 skip_bad=False, bad_list=None, require_labels=False, masks=False):
        if mode not in ('train', 'eval'):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 < audio_length <= TARGET_FRAMES:
            raise ValueError(f"audio_length must be in 1..{TARGET_FRAMES}, got {audio_length}")
        self.mode, self.audio_length, self.num_mel_bins = mode, audio_length, num_mel_bins
        self.img_size, self.num_frames = img_size, num_frames
        self.time_shift, self.seed, self.epoch = time_shift, seed, 0
        self.masks = masks
        self.clips = read_clip_table(data_json)
        if masks and self.clips and 'video_path' not in self.clips[0]:
            raise ValueError(f'{data_json}: masks=True needs a dataset JSON (shards carry no masks)')
        if not self.clips:
            raise ValueError(f"{data_json} lists no clips")
        mid_to_index, self.class_names = read_label_csv(label_csv) if label_csv else ({}, [])
        self.num_classes = len(self.class_names)
        where = f"{data_json} (label CSV {label_csv})"
        for clip in self.clips:
            clip['classes'] = label_indices(clip.pop('labels'), mid_to_index, where, clip['id'], require_labels)
        if skip_bad:
            self._drop_bad_clips(data_json, bad_list)

    def _drop_bad_clips(self, data_json, bad_list):
        """Check every wav and frame header now; drop clips with a missing or unreadable file.
        (A file whose header reads but whose data is truncated still raises when loaded.)"""
        if bad_list is None:
            bad_list = os.path.splitext(data_json.rstrip('/'))[0] + '.bad.txt'
        good, bad = [], []
        for clip in tqdm(self.clips, desc='checking clips', leave=False, disable=bad_list == ''):
            (bad.append(clip['id']) if check_clip(clip, self.num_frames) else good.append(clip))
        if bad_list != '':  # '': quiet (the other ranks of a run)
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
        item = load_item(clip, self.mode, self.epoch, self.seed, self.audio_length,
                         self.num_mel_bins, self.img_size, self.num_frames, self.time_shift)
        item['label'] = multi_hot(clip['classes'], self.num_classes)
        if self.masks:
            frames = [item['frame']] if self.mode == 'train' else range(self.num_frames)
            paths = [mask_path(clip['video_path'], i, clip['id']) for i in frames]
            has = torch.tensor([os.path.isfile(p) for p in paths])  # (T,)
            empty = torch.zeros(self.img_size, self.img_size, dtype=torch.bool)
            mask = torch.stack([load_mask(p, self.img_size, clip['id']) if ok else empty for p, ok in zip(paths, has)])
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
# shards (TG-DP supp. sec. 1.2: the clips packed into webdataset shards, because loading millions of
# small files was the bottleneck). Webdataset convention: one key per clip, members key.json
# ({"id", "labels", "index"}), key.wav (or key.flac), key.frame_00.jpg ... key.frame_15.jpg, the
# prepared files' bytes unchanged. Keys are the clip's position in the source JSON (9 digits: clip
# ids such as '--PJHxphWEs_30.000' hold dots, which webdataset would read as an extension).

SHARD_FORMAT = 'tgdp-shards/1'
SHARD_NAME = 'shards-{:05d}.tar'
MAX_OPEN_SHARDS = 64  # descriptors kept open per process (least recently used closed first)
_shard_fds, _shard_fds_pid = OrderedDict(), None


def shard_fd(path):
    """A read-only descriptor of a shard, opened once per process (a forked loader worker opens its own)."""
    global _shard_fds_pid
    if _shard_fds_pid != os.getpid():
        _shard_fds.clear()  # the parent's descriptors: not ours to use or close
        _shard_fds_pid = os.getpid()
    fd = _shard_fds.pop(path, None)
    if fd is None:
        if len(_shard_fds) >= MAX_OPEN_SHARDS:
            os.close(_shard_fds.popitem(last=False)[1])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ClipError(f"cannot open shard {path}: {e}") from e
    _shard_fds[path] = fd
    return fd


class ShardMember(io.RawIOBase):
    """Read-only file view of one tar member, bytes [offset, offset + size) of a shard, read with
    os.pread: no shared file position, so soundfile and Pillow can read it like a file, in any worker."""

    def __init__(self, tar, name, offset, size):
        super().__init__()
        self.tar, self.name, self.offset, self.size, self.pos = tar, name, offset, size, 0

    def __str__(self):
        return f'{self.name} in {self.tar}'

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = max(0, (pos, self.pos + pos, self.size + pos)[whence])
        return self.pos

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        data = os.pread(shard_fd(self.tar), max(0, n), self.offset + self.pos)
        self.pos += len(data)
        return data

    def readall(self):
        return self.read()


def tar_members(tar, start, end):
    """(name, data offset, size) of the members whose headers lie in bytes [start, end) of a tar,
    reading only the 512-byte ustar headers (parsed here: tarfile's parser costs ~1 ms per clip)."""
    fd, members, pos = shard_fd(tar), [], start
    while pos < end:
        block = os.pread(fd, 512, pos)
        if len(block) < 512 or block == bytes(512):  # end of the archive
            break
        try:
            if block[257:262] != b'ustar':
                raise ValueError('no ustar magic')
            if int(block[148:156].strip(b'\0 ') or b'0', 8) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
                raise ValueError('bad checksum')
            size = int(block[124:136].strip(b'\0 ') or b'0', 8)
            name = block[:100].split(b'\0', 1)[0].decode()
            prefix = block[345:500].split(b'\0', 1)[0].decode()
        except ValueError as e:
            raise ClipError(f"{tar}: no valid tar header at byte {pos} ({e})") from e
        if block[156:157] not in (b'0', b'\0'):
            raise ClipError(f"{tar}: member {name!r} at byte {pos} is not a plain file "
                            f"(only ustar shards as `data.py shard` writes them are read)")
        members.append((f'{prefix}/{name}' if prefix else name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
    return members


def split_member_name(name):
    """'000000012.frame_03.jpg' -> ('000000012', 'frame_03.jpg'): webdataset's key and extension."""
    base = os.path.basename(name)
    key, _, ext = base.partition('.')
    return os.path.join(os.path.dirname(name), key), ext


def clip_members(clip):
    """{extension: ShardMember} of a shard clip, from its tar headers in [offset, end)."""
    members = clip.get('members') or tar_members(clip['tar'], clip['offset'], clip['end'])
    return {split_member_name(name)[1]: ShardMember(clip['tar'], name, offset, size)
            for name, offset, size in members}


def scan_shard(tar, start=0, end=None):
    """Every clip whose headers lie in bytes [start, end) of a shard (default: all of it), from its
    headers and key.json members -> list of dicts key, id, labels, index, offset, end (the clip's
    bytes) and members [(name, data offset, size)], in tar order."""
    end = os.fstat(shard_fd(tar)).st_size if end is None else end
    clips = []
    for name, offset, size in tar_members(tar, start, end):
        key, _ = split_member_name(name)
        if not clips or clips[-1]['key'] != key:
            clips.append(dict(key=key, tar=tar, offset=offset - 512, members=[]))
        clips[-1]['members'].append((name, offset, size))
        clips[-1]['end'] = offset + (size + 511) // 512 * 512
    for clip in clips:
        meta = clip_members(clip).get('json')
        if meta is None:
            raise ClipError(f"{tar}: clip {clip['key']} has no {clip['key']}.json member")
        try:
            meta = json.loads(meta.readall())
        except ValueError as e:
            raise ClipError(f"{tar}: clip {clip['key']}: unreadable {clip['key']}.json ({e})") \
                from e
        clip.update(id=meta['id'], labels=meta.get('labels', ''), index=meta['index'])
    return clips


def shard_clip(tar, offset, end):
    """The clip in bytes [offset, end) of a shard (its range in index.json) -> scan_shard's dict."""
    clips = scan_shard(tar, offset, end)
    if len(clips) != 1:
        raise ClipError(f"{tar}: bytes {offset}..{end} hold {len(clips)} clips where its "
                        f"index.json has one: re-run the shard writer")
    return clips[0]


def table_row(clip):  # one clip of a shard in index.json
    return [clip['key'], clip['id'], clip['labels'], clip['index'], clip['offset'], clip['end']]


def expand_braces(pattern):
    """'DIR/shards-{00000..00002}.tar' -> the 3 paths (numeric ranges keep the zero padding; '{a,b}' lists too)."""
    m = re.search(r'\{([^{}]*)\}', pattern)
    if not m:
        return [pattern]
    r = re.fullmatch(r'(\d+)\.\.(\d+)', m.group(1))
    items = [str(i).zfill(len(r[1])) for i in range(int(r[1]), int(r[2]) + 1)] if r else m.group(1).split(',')
    return [p for item in items for p in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def is_shard_set(spec):
    """A shard folder, a .tar or brace pattern, or an index.json written by `data.py shard`."""
    spec = str(spec)
    if os.path.isdir(spec) or spec.endswith('.tar') or '{' in spec:
        return True
    if spec.endswith('.json') and os.path.isfile(spec):
        with open(spec) as f:
            return f'"format": "{SHARD_FORMAT}"' in f.read(100)  # index.json starts with it
    return False


def read_shard_index(path):
    with open(path) as f:
        index = json.load(f)
    if not index.get('complete'):
        raise ValueError(f"{path}: the shards are still being written (or the run stopped): "
                         f"run `data.py shard` again to finish them")
    return index


def shard_tables(spec):
    """A shard set -> [(shard path, [index.json rows: key, id, labels, index, offset, end])]. The
    rows come from the index.json next to the shards; shards it does not list are scanned (headers)."""
    spec = str(spec)
    if os.path.isdir(spec):
        index_path, paths = os.path.join(spec, 'index.json'), None
        if not os.path.isfile(index_path):
            paths = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.endswith('.tar'))
            if not paths:
                raise FileNotFoundError(f"{spec}: no index.json and no .tar shards")
    elif spec.endswith('.json'):
        index_path, paths = spec, None
    else:
        paths = expand_braces(spec)
        index_path = os.path.join(os.path.dirname(paths[0]), 'index.json')
    tables = {}
    if os.path.isfile(index_path):
        root = os.path.dirname(os.path.abspath(index_path))
        tables = {os.path.join(root, s['name']): s['clips'] for s in read_shard_index(index_path)['shards']}
    if paths is None:
        paths = list(tables)
    result = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} not found (shard set {spec})")
        rows = tables.get(os.path.abspath(path))
        result.append((path, rows if rows is not None else [table_row(c) for c in scan_shard(path)]))
    return result


def shard_payload(clip, audio, num_frames):
    """A prepared clip -> [(extension, bytes)] for its shard members, each file checked first."""
    problem = check_clip(clip, num_frames)
    if problem:
        raise ClipError(problem)
    with open(clip['wav'], 'rb') as f:
        sound = f.read()
    if audio == 'flac':  # lossless for 16- and 24-bit PCM: the samples read back unchanged
        info = sf.info(clip['wav'])
        if info.subtype not in ('PCM_16', 'PCM_24'):
            raise ClipError(f"{clip['wav']}: flac keeps 16/24-bit PCM only, this wav is {info.subtype} "
                            f"(use --audio wav)")
        samples, rate = sf.read(clip['wav'], dtype='int32', always_2d=True)
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format='FLAC', subtype=info.subtype)
        sound = buffer.getvalue()
    members = [('json', json.dumps(dict(id=clip['id'], labels=clip['labels'], index=clip['index'])).encode()),
               (audio, sound)]
    for i in range(num_frames):
        with open(clip_frame(clip, i), 'rb') as f:
            members.append((f'frame_{i:02d}.jpg', f.read()))
    return members


def pack_shard(path, clips, audio, num_frames, progress):
    """Writes one shard (tmp file + rename: a shard that exists is complete) -> (rows, {id: why skipped})."""
    rows, skipped = [], {}
    with tarfile.open(path + '.tmp', 'w', format=tarfile.USTAR_FORMAT) as tar:
        for clip in clips:
            try:
                members = shard_payload(clip, audio, num_frames)
            except (ClipError, OSError, RuntimeError) as e:
                skipped[clip['id']] = str(e)
                progress.update()
                continue
            key, offset = f"{clip['index']:09d}", tar.offset
            for ext, payload in members:
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size, info.mode, info.mtime = len(payload), 0o644, 0  # fixed metadata: same bytes every run
                tar.addfile(info, io.BytesIO(payload))
            rows.append([key, clip['id'], clip['labels'], clip['index'], offset, tar.offset])
            progress.update()
    os.replace(path + '.tmp', path)
    return rows, skipped


def write_shards(data_json, out, shard_size=1000, audio='wav', seed=0, num_frames=16, workers=1):
    """Packs the clips of a dataset JSON into OUT/shards-00000.tar, ... (shard_size clips each, in a
    permutation of the JSON order from seed, so every shard mixes classes) and OUT/index.json (per
    shard: its clips' key, id, labels, JSON index and byte range). Resumable: finished shards are
    kept (their index rows read back from their headers). Clips with a missing or unreadable file are
    left out and listed in index.json ('skipped', with the reason). Returns the index."""
    if audio not in ('wav', 'flac'):
        raise ValueError(f"audio must be 'wav' or 'flac', got {audio!r}")
    clips = read_clip_table(data_json)
    if not clips or 'tar' in clips[0]:
        raise ValueError(f"{data_json}: expected a dataset JSON with clips (shards are packed from files)")
    order = np.random.default_rng(seed).permutation(len(clips))
    groups = [[clips[i] for i in order[k:k + shard_size]] for k in range(0, len(clips), shard_size)]
    settings = dict(format=SHARD_FORMAT, complete=False, num_clips=len(clips), shard_size=shard_size, seed=seed,
                    audio=audio, num_frames=num_frames, source=os.path.relpath(os.path.abspath(data_json), out),
                    ids_sha1=hashlib.sha1('\n'.join(c['id'] for c in clips).encode()).hexdigest())
    os.makedirs(out, exist_ok=True)
    index_path = os.path.join(out, 'index.json')
    if os.path.isfile(index_path):
        with open(index_path) as f:
            old = json.load(f)
        changed = [k for k in settings if k not in ('complete', 'source') and old.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{out} holds shards written with other settings ({', '.join(changed)} differ): "
                             f"use another --out or delete the folder")
    with open(index_path, 'w') as f:
        json.dump(settings, f)  # incomplete until the end
    paths = [os.path.join(out, SHARD_NAME.format(k)) for k in range(len(groups))]
    todo = [k for k in range(len(groups)) if not os.path.isfile(paths[k])]
    print(f"{len(clips)} clips -> {len(groups)} shards: {len(groups) - len(todo)} already written, "
          f"{len(todo)} to write")
    results = {}
    with tqdm(total=sum(len(groups[k]) for k in todo), desc='shard', unit='clip') as progress:
        with ThreadPoolExecutor(workers) as pool:  # file reads and writes: threads overlap the waits
            for k, result in zip(todo, pool.map(lambda k: pack_shard(paths[k], groups[k], audio, num_frames,
                                                                     progress), todo)):
                results[k] = result
    shards, skipped = [], {}
    for k in tqdm(range(len(groups)), desc='index', leave=False):
        if k in results:
            rows, bad = results[k]
        else:  # written by an earlier run: rows from its headers, skipped clips checked again for the reason
            rows = [table_row(c) for c in scan_shard(paths[k])]
            packed = {r[1] for r in rows}
            bad = {c['id']: check_clip(c, num_frames) or 'left out by an earlier run'
                   for c in groups[k] if c['id'] not in packed}
        shards.append(dict(name=os.path.basename(paths[k]), bytes=os.path.getsize(paths[k]), clips=rows))
        skipped.update(bad)
    index = dict(settings, complete=True, shards=shards, skipped=skipped)
    with open(index_path + '.tmp', 'w') as f:
        json.dump(index, f)
    os.replace(index_path + '.tmp', index_path)
    packed = sum(len(s['clips']) for s in shards)
    print(f"wrote {index_path}: {packed} clips in {len(shards)} shards, {len(skipped)} left out"
          + (f" ({', '.join(list(skipped)[:5])}{', ...' if len(skipped) > 5 else ''}: reasons in index.json "
             f"'skipped')" if skipped else ''))
    return index


def epoch_batches(clips, world_size, batch_size, accumulation=1):
    """Micro-batches each rank takes in an epoch of `clips` clips: its share, clips // world_size
    (as DistributedSampler(drop_last=True) cuts it), in whole optimiser steps of accumulation
    batches of batch_size; the same count on every rank. Left out: less than one global batch of
    world_size * accumulation * batch_size clips."""
    return clips // world_size // (batch_size * accumulation) * accumulation


def batch_size_of(batch_size, epoch):
    """An epoch's batch size: an int, a list per epoch whose last entry holds on, or a function."""
    b = batch_size
    if callable(b):
        b = b(epoch)
    elif isinstance(b, (list, tuple)):
        b = b[min(epoch, len(b) - 1)]
    if b < 1:
        raise ValueError(f"batch size {b} for epoch {epoch}")
    return int(b)


def shuffled(positions, buffer_size, rng):
    """A stream's local shuffle: a buffer of buffer_size items, each new one in a random one's."""
    buffer = []
    for p in positions:
        if len(buffer) < buffer_size:
            buffer.append(p)
            continue
        j = int(rng.integers(len(buffer)))
        yield buffer[j]
        buffer[j] = p
    yield from (buffer[j] for j in rng.permutation(len(buffer)))


def readable_or_error(load, skip_bad):
    """load() -> its item; with skip_bad, an unreadable clip (ClipError) -> {'error': message}."""
    try:
        return load()
    except ClipError as e:
        if not skip_bad:
            raise
        return dict(error=str(e))


def collate_readable(items):
    """collate, each error item (readable_or_error) replaced by a copy of a readable item of the
    same batch: the batch keeps its size, so every rank draws the same noise and stays in step.
    batch['skipped'] lists the errors."""
    good = [item for item in items if 'error' not in item]
    errors = [item['error'] for item in items if 'error' in item]
    if not good:
        raise ClipError('every clip of a batch is unreadable: ' + '; '.join(errors))
    batch = collate([good[n % len(good)] if 'error' in item else item
                     for n, item in enumerate(items)])
    batch['skipped'] = errors
    return batch


def ignore_sigterm(_):  # loader workers: the main process handles pre-emption and shuts them down
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def device_batches(source, loader, device):
    """A loader's batches -> (audio, image) on the device; skipped clips add to source.skipped."""
    for batch in loader:
        for error in batch['skipped']:
            source.skipped += 1
            print(f'skip_bad: skipped an unreadable clip: {error}', file=sys.stderr)
        audio = batch['audio'].to(device, non_blocking=True)  # (B, L, F)
        yield audio, batch['image'].to(device, non_blocking=True)  # (B, 3, H, W)


class ShardStream(torch.utils.data.IterableDataset):
    """Training batches from a shard set, endless across epochs, each reader reading its clips in
    order (sequential reads). In epoch e, with W = max(1, num_workers) loader workers per rank:
    - the shards in a permutation from (seed, e), each in tar order, make one sequence of all N
      clips; rank r takes N // world_size of them from r * (N // world_size) on and uses
      batches_per_epoch(e) batches of batch_size(e) (an int, a list per epoch whose last entry
      holds on, or a function): whole optimiser steps of `accumulation` batches, the same count on
      every rank (epoch_batches), so no rank waits for another and less than one global batch is
      left out;
    - a rank's batches are numbered across epochs and batch g comes from reader role g mod W: the
      DataLoader takes batches from its workers in turn, so they arrive in order. Each role takes a
      contiguous run of the rank's clips (whatever the shards' boundaries: each clip is read from
      its own byte range in the index) through a shuffle buffer of shuffle_buffer clips seeded
      from (seed, e, rank, role).
    Items are AVDataset's train items of the JSON the shards were packed from (frame and time
    shift drawn from (seed, e, clip index)); a batch is collate's dict plus 'epoch', 'batch' (its
    position in the rank's epoch) and 'skipped'. skip_bad: an unreadable clip is replaced by a
    copy of another clip of its batch and named in 'skipped' (collate_readable); else ClipError.
    start=(epoch, k) begins at batch k of that epoch, with exactly the batches an uninterrupted
    stream yields from there (nothing before it is read). Resume needs the same shards, seed,
    shuffle_buffer, world_size and num_workers: save layout() with the checkpoint and pass it back
    as resume_layout (a difference raises ValueError)."""

    def __init__(self, shards, batch_size, label_csv=None, seed=0, rank=0, world_size=1,
                 num_workers=0, start=(0, 0), shuffle_buffer=1000, audio_length=416,
                 num_mel_bins=128, img_size=224, num_frames=16, time_shift=False,
                 resume_layout=None, accumulation=1, skip_bad=False):
        tables = shard_tables(shards)
        self.shards = [(path, len(rows)) for path, rows in tables]
        # clip c of shard s: bytes [starts[s][c], starts[s][c + 1]); arrays, light to fork
        self.starts = [np.array([row[4] for row in rows] + [rows[-1][5] if rows else 0],
                                dtype=np.int64) for _, rows in tables]
        self.clips = sum(n for _, n in self.shards)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.accumulation, self.skip_bad, self.skipped = accumulation, skip_bad, 0
        self.mid_to_index, self.class_names = read_label_csv(label_csv) if label_csv else ({}, [])
        self.where = f"{shards} (label CSV {label_csv})"
        self.item_args = dict(audio_length=audio_length, num_mel_bins=num_mel_bins,
                              img_size=img_size, num_frames=num_frames, time_shift=time_shift)
        if resume_layout is not None:
            changed = [k for k, v in self.layout().items() if resume_layout.get(k) != v]
            if changed:
                raise ValueError(f"resume: {', '.join(changed)} changed since the checkpoint; "
                                 f"mid-epoch resume of a shard stream needs the same shards, seed, "
                                 f"shuffle buffer, world size and num_workers")
        self.set_start(*start)

    def set_start(self, epoch, k):
        """Begin at batch k of epoch `epoch` (before making the DataLoader: workers copy it)."""
        if not 0 <= k < self.batches_per_epoch(epoch):
            raise ValueError(f"start batch {k} is outside epoch {epoch} "
                             f"({self.batches_per_epoch(epoch)} batches)")
        self.start = (epoch, k)

    def layout(self):
        """What a mid-epoch resume must find unchanged (save it with the checkpoint)."""
        return dict(shards=[[os.path.basename(p), n] for p, n in self.shards], seed=self.seed,
                    shuffle_buffer=self.shuffle_buffer, world_size=self.world_size,
                    num_workers=self.num_workers)

    def epoch_batch_size(self, epoch):
        return batch_size_of(self.batch_size, epoch)

    def batches_per_epoch(self, epoch):
        """Batches each rank gets in an epoch (the same on every rank); cheap, call it anywhere."""
        B = self.epoch_batch_size(epoch)
        return epoch_batches(self.clips, self.world_size, B, self.accumulation)

    def role_batches(self, epoch, role):
        """[(k, sequence positions of its clips)] for the batches k of the rank's epoch that reader
        role makes, in order; positions only (nothing is read)."""
        W, B = max(1, self.num_workers), self.epoch_batch_size(epoch)
        M = self.batches_per_epoch(epoch)
        if M == 0:
            raise ValueError(f"epoch {epoch}: {self.clips} clips fill no batch of {B} on each of "
                             f"{self.world_size} ranks")
        first = sum(self.batches_per_epoch(e) for e in range(epoch))  # the rank's batches before
        numbers = [[k for k in range(M) if (first + k) % W == w] for w in range(W)]
        begin = self.rank * (self.clips // self.world_size) + B * sum(map(len, numbers[:role]))
        rng = np.random.default_rng((self.seed, epoch, self.rank, role))
        run = range(begin, begin + B * len(numbers[role]))  # this role's clips, in sequence order
        order = list(shuffled(run, self.shuffle_buffer, rng))
        return [(k, order[j * B:(j + 1) * B]) for j, k in enumerate(numbers[role])]

    def epoch_order(self, epoch):
        """(the epoch's shard permutation, the sequence position where each of its shards ends)."""
        if getattr(self, '_order', (None,))[0] != epoch:  # one epoch at a time: kept
            perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards))
            self._order = epoch, perm, np.cumsum([self.shards[s][1] for s in perm])
        return self._order[1:]

    def byte_range(self, epoch, position):
        """Sequence position of an epoch -> (shard path, offset, end) of that clip's bytes."""
        perm, ends = self.epoch_order(epoch)
        i = int(np.searchsorted(ends, position, side='right'))
        s, c = int(perm[i]), position - (int(ends[i - 1]) if i else 0)
        return self.shards[s][0], int(self.starts[s][c]), int(self.starts[s][c + 1])

    def load(self, epoch, position):
        path, offset, end = self.byte_range(epoch, position)
        clip = shard_clip(path, offset, end)
        classes = label_indices(clip['labels'], self.mid_to_index, self.where, clip['id'])
        item = load_item(clip, 'train', epoch, self.seed, **self.item_args)
        return dict(item, label=multi_hot(classes, len(self.class_names)))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 0
        if workers != self.num_workers:
            raise ValueError(f"ShardStream was built for num_workers={self.num_workers} but runs "
                             f"with {workers}: give the DataLoader the same num_workers")
        epoch, k = self.start
        first = sum(self.batches_per_epoch(e) for e in range(epoch)) + k  # the run's batch number
        # a resumed loader begins at worker 0: worker i takes the batches first + i + W * j
        role = (first + (info.id if info else 0)) % max(1, workers)
        advised = set()
        while True:
            for number, positions in self.role_batches(epoch, role):
                if number < k:
                    continue
                self.read_ahead(epoch, positions, advised)
                items = [readable_or_error(functools.partial(self.load, epoch, p), self.skip_bad)
                         for p in positions]
                batch = collate_readable(items)
                batch['epoch'], batch['batch'] = epoch, number
                yield batch
            epoch, k = epoch + 1, 0

    def loader(self, epoch, batch, device):
        """(audio, image) batches on the device from batch `batch` of `epoch` on, endless."""
        self.set_start(epoch, batch)
        loader = torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.num_workers,
                                             pin_memory=device.startswith('cuda'),
                                             worker_init_fn=ignore_sigterm)
        yield from device_batches(self, loader, device)

    def read_ahead(self, epoch, positions, advised):
        """Ask the kernel to read the shards of these clips ahead, in the background (once each)."""
        for p in positions:
            path = self.byte_range(epoch, p)[0]
            if (epoch, path) not in advised:
                advised.add((epoch, path))
                os.posix_fadvise(shard_fd(path), 0, 0, os.POSIX_FADV_WILLNEED)


class FileBatches:
    """Training batches of an AVDataset read by random access (a dataset JSON): epoch e is
    DistributedSampler's share of a permutation from (seed, e) (rank r takes every world_size-th
    clip), cut into batches_per_epoch(e) batches of batch_size(e) (an int or a list per epoch whose
    last entry holds on). Items are a pure function of (seed, epoch, clip index), so one loader
    serves every epoch and its workers stay alive across epoch boundaries. skip_bad: as
    ShardStream's."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, num_workers=0, accumulation=1,
                 seed=0, skip_bad=False):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.clips, self.world_size, self.seed = len(dataset), world_size, seed
        self.accumulation = accumulation
        self.sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True,
                                                           seed=seed, drop_last=True)
        self.skip_bad, self.skipped = skip_bad, 0

    def batches_per_epoch(self, epoch):
        return epoch_batches(self.clips, self.world_size, batch_size_of(self.batch_size, epoch),
                             self.accumulation)

    def layout(self):
        return dict(clips=self.clips, world_size=self.world_size, seed=self.seed)

    def batch_keys(self, epoch, k):
        """This rank's batches as lists of (epoch, index) keys from batch k of an epoch on."""
        while True:
            self.sampler.set_epoch(epoch)
            order, B = list(self.sampler), batch_size_of(self.batch_size, epoch)
            for b in range(k, self.batches_per_epoch(epoch)):
                yield [(epoch, i) for i in order[b * B:(b + 1) * B]]
            epoch, k = epoch + 1, 0

    def __getitem__(self, key):  # (epoch, index) -> that epoch's item (a loader worker's copy)
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return readable_or_error(lambda: self.dataset[index], self.skip_bad)

    def loader(self, epoch, batch, device):
        """(audio, image) batches on the device from batch `batch` of `epoch` on, endless."""
        loader = torch.utils.data.DataLoader(self, batch_sampler=self.batch_keys(epoch, batch),
                                             num_workers=self.num_workers,
                                             pin_memory=device.startswith('cuda'),
                                             collate_fn=collate_readable,
                                             worker_init_fn=ignore_sigterm)
        yield from device_batches(self, loader, device)


class RandomBatches:
    """The bench's data: one random (audio, image) batch again and again, nothing read; an epoch is
    `steps` optimiser steps."""

    def __init__(self, batch_size, steps, accumulation=1, audio_length=416, num_mel_bins=128,
                 img_size=224):
        self.batch_size, self.steps, self.accumulation = batch_size, steps, accumulation
        self.shape_a = (batch_size, audio_length, num_mel_bins)
        self.shape_v = (batch_size, 3, img_size, img_size)
        self.clips, self.skipped = batch_size, 0

    def batches_per_epoch(self, epoch):
        return self.steps * self.accumulation

    def layout(self):
        return {}

    def loader(self, epoch, batch, device):
        audio = torch.randn(*self.shape_a, device=device)  # (B, L, F)
        image = torch.randn(*self.shape_v, device=device)  # (B, 3, H, W)
        while True:
            yield audio, image


def train_batches(spec, batch_size, seed=0, rank=0, world_size=1, num_workers=0, accumulation=1,
                  shuffle_buffer=1000, skip_bad=False, bad_list=None, **item_args):
    """Pretraining batches, one interface whatever the source: a shard set -> ShardStream
    (sequential reads), a dataset JSON -> FileBatches of AVDataset (skip_bad: unreadable clips
    dropped at start-up, listed in bad_list; shards were checked when written). Each has clips,
    batches_per_epoch(epoch), layout() (for the checkpoint), loader(epoch, batch, device) and
    skipped (clips skipped mid-run). item_args: audio_length, num_mel_bins, img_size, num_frames,
    time_shift."""
    if is_shard_set(spec):
        return ShardStream(spec, batch_size, seed=seed, rank=rank, world_size=world_size,
                           num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                           accumulation=accumulation, skip_bad=skip_bad, **item_args)
    dataset = AVDataset(spec, mode='train', seed=seed, skip_bad=skip_bad, bad_list=bad_list,
                        **item_args)
    return FileBatches(dataset, batch_size, rank, world_size, num_workers, accumulation, seed,
                       skip_bad)


# =============================================================================
# Tools: synthetic clips, raw-video preparation, labelled splits, loader benchmark. The core above
# (features, AVDataset, shards) is all that training and evaluation read.
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


class NoAudioTrack(RuntimeError):
    """The video has no audio stream (a few % of AudioSet / VGGSound downloads)."""


def prepare_video(ffmpeg, video, out, num_frames=16, short_side=224):
    """One video -> OUT/audio/{id}.wav (16 kHz, first channel) and OUT/frame_{i}/{id}.jpg.
    Frames: ffmpeg's fps filter at num_frames/10 fps over the first 10 s, so frame i is the video
    frame shown at about t = i * 10 / num_frames s. Frames are scaled down (bicubic) so that the
    shorter side is at most short_side (0: keep). Files appear atomically (tmp + rename), so an
    interrupted run never leaves a clip that looks done. Raises NoAudioTrack for a video without
    audio, RuntimeError with ffmpeg's message for other failures."""
    clip_id = os.path.splitext(os.path.basename(video))[0]
    tmp = os.path.join(out, '.tmp', clip_id)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def run(args):
        result = subprocess.run([ffmpeg, '-nostdin', '-v', 'error', '-y', *args], capture_output=True, text=True)
        if result.returncode != 0:
            message = result.stderr.strip()[-500:] or f'ffmpeg exit code {result.returncode}'
            if "map '0:a:0' matches no streams" in message:
                raise NoAudioTrack(f'no audio track ({message.splitlines()[0]})')
            raise RuntimeError(message)

    try:  # audio first: a video without audio fails before its frames are decoded
        run(['-i', video, '-map', '0:a:0', '-af', 'pan=mono|c0=c0', '-ar', str(SAMPLE_RATE),
             '-c:a', 'pcm_s16le', os.path.join(tmp, 'audio.wav')])
        scale = ''
        if short_side:
            scale = (f",scale=w='if(lte(iw,ih),min(iw,{short_side}),-2)'"
                     f":h='if(lte(iw,ih),-2,min(ih,{short_side}))':flags=bicubic")
        run(['-t', '10', '-i', video, '-vf', f'fps={num_frames}/10{scale}', '-frames:v', str(num_frames),
             '-q:v', '2', os.path.join(tmp, '%02d.jpg')])
        got = len([n for n in os.listdir(tmp) if n.endswith('.jpg')])
        if got < num_frames:
            raise RuntimeError(f'only {got} of {num_frames} frames in the first 10 s (video too short?)')
        for i in range(num_frames):  # ffmpeg numbers from 1
            os.replace(os.path.join(tmp, f'{i + 1:02d}.jpg'), frame_path(out, i, clip_id))
        os.replace(os.path.join(tmp, 'audio.wav'), os.path.join(out, 'audio', f'{clip_id}.wav'))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepared_ids(out, num_frames=16):
    """Clip ids whose wav and all frames exist in a prepared folder (one listing per folder, not a
    stat per file: fast on 2 M clips)."""
    def stems(folder, ext):
        folder = os.path.join(out, folder)
        return {n[:-len(ext)] for n in os.listdir(folder) if n.endswith(ext)} if os.path.isdir(folder) else set()
    ids = stems('audio', '.wav')
    for i in range(num_frames):
        ids &= stems(f'frame_{i}', '.jpg')
    return ids


def read_failures(out):
    """OUT/failed.json of prepare: {clip id: {video, error: 'no_audio' | 'ffmpeg', message}}."""
    path = os.path.join(out, 'failed.json')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def prepare(videos, out, num_frames=16, short_side=224, workers=1):
    """Raw videos -> CAV-MAE layout in OUT and OUT/data.json (clip id = file stem, labels empty; the
    `audioset` / `vggsound` commands write labelled splits). Resumable: clips whose wav and frames
    exist are skipped. Videos that could not be prepared are kept in OUT/failed.json (no audio track
    or ffmpeg's message; a later run retries them). Returns {video: error} of this run's failures."""
    paths = list_videos(videos)
    ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)  # linear: 2 M videos
    if duplicates:
        raise ValueError(f"{videos}: several videos share the clip id(s) {duplicates[:5]} (file stem)")
    ffmpeg = shutil.which('ffmpeg')
    if ffmpeg is None:
        raise RuntimeError("ffmpeg not found on PATH: `prepare` needs the ffmpeg command-line tool "
                           "(e.g. apt-get install ffmpeg)")
    os.makedirs(os.path.join(out, 'audio'), exist_ok=True)
    for i in range(num_frames):
        os.makedirs(os.path.join(out, f'frame_{i}'), exist_ok=True)
    done = prepared_ids(out, num_frames)
    todo = [p for p, i in zip(paths, ids) if i not in done]
    print(f"{len(paths)} videos: {len(paths) - len(todo)} already done, {len(todo)} to prepare")
    failures = {}

    def work(video):
        try:
            prepare_video(ffmpeg, video, out, num_frames, short_side)
        except Exception as e:
            failures[video] = e

    with ThreadPoolExecutor(workers) as pool:  # ffmpeg does the work, threads only wait
        list(tqdm(pool.map(work, todo), total=len(todo), desc='prepare'))
    shutil.rmtree(os.path.join(out, '.tmp'), ignore_errors=True)
    done = prepared_ids(out, num_frames)
    entries = [dict(video_id=i, wav=f'audio/{i}.wav', video_path='.', labels='') for i in ids if i in done]
    with open(os.path.join(out, 'data.json'), 'w') as f:
        json.dump({'data': entries}, f, indent=1)
    print(f"wrote {os.path.join(out, 'data.json')} with {len(entries)} clips")
    record = {i: r for i, r in read_failures(out).items() if i not in done}  # earlier runs, still not done
    for video, e in failures.items():
        record[os.path.splitext(os.path.basename(video))[0]] = dict(
            video=video, error='no_audio' if isinstance(e, NoAudioTrack) else 'ffmpeg', message=str(e))
    with open(os.path.join(out, 'failed.json'), 'w') as f:
        json.dump(record, f, indent=1)
    silent = [v for v, e in failures.items() if isinstance(e, NoAudioTrack)]
    if silent:
        print(f"{len(silent)} videos without an audio track (skipped):")
        for video in silent:
            print(f"  {video}")
    if len(failures) > len(silent):
        print(f"{len(failures) - len(silent)} videos failed:")
        for video, e in failures.items():
            if not isinstance(e, NoAudioTrack):
                print(f"  {video}: {e}")
    if failures:
        print(f"(kept in {os.path.join(out, 'failed.json')})")
    return {video: str(e) for video, e in failures.items()}


# -----------------------------------------------------------------------------
# labels and splits from the official metadata

AUDIOSET_ID = '{YTID}_{start:.3f}'  # e.g. --PJHxphWEs_30.000.mp4; '{YTID}' for downloads named by YTID only
VGGSOUND_ID = '{YTID}_{start:06d}'  # e.g. ---g-f_I2yQ_000001.mp4


def clip_id_for(id_format, ytid, start, where):
    """A downloader's file stem from a CSV row: id_format with {YTID} and {start} (an int when whole
    seconds, so both '{start:06d}' and '{start:.3f}' work)."""
    start = int(start) if float(start).is_integer() else float(start)
    try:
        return id_format.format(YTID=ytid, start=start)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{where}: id format {id_format!r} does not fit YTID={ytid!r} start={start!r}: {e}") from e


def add_row(requested, clip_id, mids, counts):
    """requested {id: [mids]} in CSV order; a repeated id merges its labels and counts as a duplicate."""
    if clip_id in requested:
        counts['duplicate_rows'] += 1
        requested[clip_id] += [m for m in mids if m not in requested[clip_id]]
    else:
        requested[clip_id] = list(mids)


def read_audioset_segments(paths, id_format, mid_to_index, requested=None, counts=None):
    """Official AudioSet segment CSVs ('#' comment lines, rows YTID, start_seconds, end_seconds,
    "mid1,mid2") -> ({clip id: [mids]} in file order, {'duplicate_rows': n})."""
    requested = {} if requested is None else requested
    counts = counts or Counter(duplicate_rows=0)
    for path in paths:
        with open(path, newline='') as f:
            for line, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
                if not row or row[0].lstrip().startswith('#'):
                    continue
                if len(row) != 4:
                    raise ValueError(f'{path}:{line}: expected YTID, start_seconds, end_seconds, "labels", got {row}')
                ytid, start, _, labels = row
                mids = [m.strip() for m in labels.split(',') if m.strip()]
                unknown = [m for m in mids if m not in mid_to_index]
                if unknown:
                    raise ValueError(f'{path}:{line}: label ids {unknown} are not in the label CSV')
                add_row(requested, clip_id_for(id_format, ytid.strip(), float(start), f'{path}:{line}'), mids, counts)
    return requested, counts


def label_key(text):
    """VGGSound label text as in vggsound.csv ('bird chirping, tweeting') and as in the class CSV,
    where commas were written as underscores ('bird chirping_ tweeting')."""
    return ' '.join(text.replace('_', ',').split()).lower()


def read_vggsound_csv(path, id_format, label_csv):
    """vggsound.csv (no header; rows YTID,start_seconds,label text,train|test) -> {'train': {id: [mid]},
    'test': {...}} with the class CSV's mids (matched by display_name), and {'duplicate_rows': n}."""
    mid_to_index, names = read_label_csv(label_csv)
    index_to_mid = {i: m for m, i in mid_to_index.items()}
    by_name = {label_key(name): index_to_mid[i] for i, name in enumerate(names)}
    splits, counts = {'train': {}, 'test': {}}, Counter(duplicate_rows=0)
    with open(path, newline='') as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or row[0].lstrip().startswith('#'):
                continue
            if len(row) != 4 or row[3].strip() not in splits:
                raise ValueError(f'{path}:{line}: expected YTID,start_seconds,label,train|test, got {row}')
            ytid, start, text, split = (x.strip() for x in row)
            if label_key(text) not in by_name:
                raise ValueError(f'{path}:{line}: label {text!r} is not a display_name of {label_csv}')
            try:
                start = float(start)
            except ValueError:
                raise ValueError(f'{path}:{line}: start_seconds {start!r} is not a number') from None
            add_row(splits[split], clip_id_for(id_format, ytid, start, f'{path}:{line}'),
                    [by_name[label_key(text)]], counts)
    return splits, counts


def prepared_clips(prepared, ids, num_frames=16, check=True, workers=4):
    """Which requested ids a `prepare` folder holds -> (clips {id: (wav, frames folder)}, reasons
    {id: (kind, message)} for no_audio / failed (from failed.json) / unreadable ones)."""
    present = prepared_ids(prepared, num_frames)
    failures = read_failures(prepared)
    found = [i for i in ids if i in present]
    reasons = {i: ('no_audio' if failures[i]['error'] == 'no_audio' else 'failed', failures[i]['message'])
               for i in ids if i not in present and i in failures}
    if check:
        with ThreadPoolExecutor(workers) as pool:
            def check(i):
                return check_clip(dict(id=i, wav=os.path.join(prepared, 'audio', f'{i}.wav'), video_path=prepared),
                                  num_frames)
            problems = list(tqdm(pool.map(check, found), total=len(found), desc='checking clips', leave=False))
        reasons.update({i: ('unreadable', p) for i, p in zip(found, problems) if p})
    clips = {i: (os.path.join(prepared, 'audio', f'{i}.wav'), prepared) for i in found if i not in reasons}
    return clips, reasons


def write_split(out_json, requested, clips, reasons, label_csv=None, duplicate_rows=0, extra=None):
    """requested {id: [mids]} -> out_json with the clips that are ready (paths relative to the JSON)
    and a summary printed and written next to it: <name>.summary.json (counts, no-audio ids, failed
    and unreadable ids with their messages, classes with no clip) and <name>.missing.txt (ids with no
    prepared clip and no recorded failure: usually videos that were never downloaded)."""
    out_dir = os.path.dirname(os.path.abspath(out_json))
    os.makedirs(out_dir, exist_ok=True)
    entries = [dict(video_id=i, wav=os.path.relpath(clips[i][0], out_dir),
                    video_path=os.path.relpath(clips[i][1], out_dir), labels=','.join(mids))
               for i, mids in requested.items() if i in clips]
    with open(out_json, 'w') as f:
        json.dump({'data': entries}, f, indent=1)
    stem = os.path.splitext(out_json)[0]
    missing = [i for i in requested if i not in clips and i not in reasons]
    with open(stem + '.missing.txt', 'w') as f:
        f.writelines(i + '\n' for i in missing)
    kinds = {k: {i: m for i, (kind, m) in reasons.items() if kind == k and i in requested}
             for k in ('no_audio', 'failed', 'unreadable')}
    summary = dict(json=os.path.basename(out_json), requested=len(requested), written=len(entries),
                   missing=len(missing), missing_list=os.path.basename(stem + '.missing.txt'),
                   no_audio=sorted(kinds['no_audio']), failed=kinds['failed'], unreadable=kinds['unreadable'],
                   duplicate_rows=duplicate_rows, **(extra or {}))
    line = (f"{out_json}: {len(requested)} clips requested, {len(entries)} written, {len(missing)} missing "
            f"(ids in {stem}.missing.txt), {len(kinds['no_audio'])} without an audio track, "
            f"{len(kinds['failed'])} failed in preparation, {len(kinds['unreadable'])} unreadable, "
            f"{duplicate_rows} duplicate rows")
    if label_csv:
        mid_to_index, names = read_label_csv(label_csv)
        covered = {m for e in entries for m in e['labels'].split(',') if m}
        empty = [names[i] for m, i in sorted(mid_to_index.items(), key=lambda x: x[1]) if m not in covered]
        summary['classes_without_clips'] = empty
        line += f"; {len(empty)} of {len(names)} classes have no clip"
        if empty:
            line += f" ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})"
    with open(stem + '.summary.json', 'w') as f:
        json.dump(summary, f, indent=1)
    print(line)
    for kind in ('failed', 'unreadable'):
        for i, message in list(kinds[kind].items())[:10]:
            print(f"  {kind} {i}: {message}")
    print(f"  summary in {stem}.summary.json")
    return summary


def build_audioset(prepared, label_csv, out, balanced=None, unbalanced=None, eval_csv=None,
                   id_format=AUDIOSET_ID, num_frames=16, check=True, workers=4):
    """AudioSet segment CSVs -> OUT/as20k_train.json (balanced), OUT/as2m_train.json (balanced +
    unbalanced), OUT/as_eval.json (eval), each with its summary. Returns {name: summary}."""
    mid_to_index, _ = read_label_csv(label_csv)
    splits = {}
    if balanced:
        splits['as20k_train'] = [balanced]
    if balanced and unbalanced:
        splits['as2m_train'] = [balanced, unbalanced]
    elif unbalanced:
        raise ValueError('--unbalanced needs --balanced too: AS-2M training is balanced + unbalanced')
    if eval_csv:
        splits['as_eval'] = [eval_csv]
    if not splits:
        raise ValueError('give at least one of --balanced, --unbalanced, --eval')
    summaries = {}
    for name, paths in splits.items():
        requested, counts = read_audioset_segments(paths, id_format, mid_to_index)
        clips, reasons = prepared_clips(prepared, list(requested), num_frames, check, workers)
        summaries[name] = write_split(os.path.join(out, f'{name}.json'), requested, clips, reasons,
                                      label_csv, counts['duplicate_rows'])
    return summaries


def build_vggsound(prepared, csv_path, label_csv, out, id_format=VGGSOUND_ID, num_frames=16, check=True, workers=4):
    """vggsound.csv -> OUT/vgg_train.json and OUT/vgg_test.json with summaries. Returns {name: summary}."""
    splits, counts = read_vggsound_csv(csv_path, id_format, label_csv)
    summaries = {}
    for split, requested in splits.items():
        clips, reasons = prepared_clips(prepared, list(requested), num_frames, check, workers)
        summaries[f'vgg_{split}'] = write_split(os.path.join(out, f'vgg_{split}.json'), requested, clips, reasons,
                                                label_csv, counts['duplicate_rows'] if split == 'train' else 0)
    return summaries


def build_subset(data_json, out_json, ids_file=None, template=None, label_csv=None):
    """A subset of a labelled split (retrieval sets) -> out_json in the order of an id list (one id a
    line) or of a template JSON whose placeholder paths are replaced by the split's prepared files.
    Labels come from the split (the official CSV); the summary counts template labels that differ.
    Ids the split lacks are classified with the split's own summary (no audio, failed, unreadable)."""
    if (ids_file is None) == (template is None):
        raise ValueError('give exactly one of --ids and --template')
    if template:
        with open(template) as f:
            wanted = {e['video_id']: e.get('labels', '') for e in json.load(f)['data']}
    else:
        with open(ids_file) as f:
            wanted = {line.strip(): None for line in f if line.strip() and not line.startswith('#')}
    root = os.path.dirname(os.path.abspath(data_json))
    with open(data_json) as f:
        source = {e['video_id']: e for e in json.load(f)['data']}
    requested = {i: [m for m in (source[i]['labels'] if i in source else labels or '').split(',') if m]
                 for i, labels in wanted.items()}
    clips = {i: (os.path.join(root, e['wav']), os.path.join(root, e['video_path'])) for i, e in source.items()}
    reasons = {}
    summary_path = os.path.splitext(data_json)[0] + '.summary.json'
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            s = json.load(f)
        reasons.update({i: ('no_audio', 'no audio track') for i in s.get('no_audio', [])})
        reasons.update({i: ('failed', m) for i, m in s.get('failed', {}).items()})
        reasons.update({i: ('unreadable', m) for i, m in s.get('unreadable', {}).items()})
    differ = sorted(i for i, labels in wanted.items() if labels is not None and i in source and
                    set(labels.split(',')) != set(source[i]['labels'].split(',')))
    return write_split(out_json, requested, clips, reasons, label_csv,
                       extra=dict(source=os.path.relpath(data_json, os.path.dirname(os.path.abspath(out_json))),
                                  labels_differ_from_template=differ))


# -----------------------------------------------------------------------------
# loader benchmark

def dataset_files(spec):
    """Every file a dataset reads: its wavs and frames, or its shards."""
    if is_shard_set(spec):
        return [path for path, _ in shard_tables(spec)]
    return [f for c in read_clip_table(spec) for f in [c['wav']] + [frame_path(c['video_path'], i, c['id'])
                                                               for i in range(16)] if os.path.isfile(f)]


def evict_from_page_cache(paths):
    """Drops the files' pages from the page cache (posix_fadvise DONTNEED: no root needed, other
    files stay cached, unlike /proc/sys/vm/drop_caches) -> bytes evicted."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def bench(data_json, workers=0, img_size=224, audio_length=416, num_mel_bins=128,
          batch_size=32, num_batches=10, cold=False, shuffle_buffer=100):
    """Prints training items/s (total and per worker) through a DataLoader: from files (a dataset
    JSON, clips in random order) or from shards (ShardStream). cold: evict the dataset's files from
    the page cache first, so the reads come from the disk."""
    if cold:
        files = dataset_files(data_json)
        print(f"evicted {len(files)} files ({evict_from_page_cache(files) / 2 ** 20:.0f} MiB) from the page cache")
    if is_shard_set(data_json):
        stream = ShardStream(data_json, batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer,
                             audio_length=audio_length, num_mel_bins=num_mel_bins, img_size=img_size, time_shift=True)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        source = f'shards, shuffle buffer {shuffle_buffer}'
    else:
        dataset = AVDataset(data_json, mode='train', audio_length=audio_length,
                            num_mel_bins=num_mel_bins, img_size=img_size, time_shift=True)
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=min(len(dataset), batch_size * (num_batches + 1)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                             num_workers=workers, collate_fn=collate)
        source = 'files'
    batches = iter(loader)
    next(batches)  # warm-up: worker start
    t0, n = time.perf_counter(), 0
    for _ in range(num_batches):
        batch = next(batches, None)
        if batch is None:
            break
        n += len(batch['id'])
    per_second = n / (time.perf_counter() - t0)
    print(f"{per_second:.1f} items/s, {per_second / max(1, workers):.1f} items/s per worker "
          f"({source}, {workers} workers, img_size {img_size}, audio_length {audio_length}, {n} items"
          f"{', cold page cache' if cold else ''})")
    del batches
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
    p = sub.add_parser('audioset', help='AudioSet segment CSVs + a prepared folder -> labelled split JSONs')
    p.add_argument('--prepared', required=True, help='folder written by `prepare`')
    p.add_argument('--label_csv', required=True, help='class_labels_indices.csv (527 classes)')
    p.add_argument('--out', required=True, help='folder for as20k_train.json, as2m_train.json, as_eval.json')
    p.add_argument('--balanced', help='balanced_train_segments.csv (-> as20k_train.json)')
    p.add_argument('--unbalanced', help='unbalanced_train_segments.csv (+ balanced -> as2m_train.json)')
    p.add_argument('--eval', dest='eval_csv', help='eval_segments.csv (-> as_eval.json)')
    p.add_argument('--id_format', default=AUDIOSET_ID, help="clip id (video file stem) of a row: '{YTID}_{start:.3f}' "
                   "(default), '{YTID}', or any format of YTID and start")
    p = sub.add_parser('vggsound', help='vggsound.csv + a prepared folder -> labelled train / test JSONs')
    p.add_argument('--prepared', required=True, help='folder written by `prepare`')
    p.add_argument('--csv', required=True, help='vggsound.csv (YTID,start_seconds,label,train|test; no header)')
    p.add_argument('--label_csv', required=True, help='the 309-class CSV index,mid,display_name')
    p.add_argument('--out', required=True, help='folder for vgg_train.json, vgg_test.json')
    p.add_argument('--id_format', default=VGGSOUND_ID, help="clip id of a row (default '{YTID}_{start:06d}')")
    for p in sub.choices['audioset'], sub.choices['vggsound']:
        p.add_argument('--num_frames', type=int, default=16)
        p.add_argument('--no_check', action='store_true', help="don't open every wav and frame header")
        p.add_argument('--workers', type=int, default=4, help='threads checking files')
    p = sub.add_parser('subset', help='a subset of a labelled split (retrieval sets) from an id list or a template')
    p.add_argument('--data', required=True, help='labelled split JSON (e.g. vgg_test.json)')
    p.add_argument('--out', required=True)
    p.add_argument('--ids', help='text file, one clip id a line')
    p.add_argument('--template', help='JSON listing the clips (e.g. vggsound_retrieval_split_template.json)')
    p.add_argument('--label_csv', help='to list classes with no clip in the summary')
    p = sub.add_parser('shard', help='pack the clips of a dataset JSON into tar shards (webdataset convention)')
    p.add_argument('--data', required=True, help='dataset JSON')
    p.add_argument('--out', required=True, help='folder for shards-00000.tar, ... and index.json')
    p.add_argument('--shard_size', type=int, default=1000, help='clips per shard (~0.5 GB at 1000 prepared clips)')
    p.add_argument('--audio', choices=('wav', 'flac'), default='wav', help='flac: lossless, about half the bytes')
    p.add_argument('--seed', type=int, default=0, help='permutation of the clips over the shards')
    p.add_argument('--num_frames', type=int, default=16)
    p.add_argument('--workers', type=int, default=1, help='shards written at a time')
    p = sub.add_parser('bench', help='data-loader throughput')
    p.add_argument('--data', required=True, help='dataset JSON or shard set')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--audio_length', type=int, default=416)
    p.add_argument('--num_mel_bins', type=int, default=128)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--num_batches', type=int, default=10)
    p.add_argument('--cold', action='store_true', help="evict the dataset's files from the page cache first")
    p.add_argument('--shuffle_buffer', type=int, default=100, help='shards: ShardStream buffer')
    args = parser.parse_args()

    if args.command == 'synth':
        make_synthetic(args.out, args.num_clips, args.seed, args.num_classes, args.frame_size,
                       on_slots=tuple(args.on_slots), offscreen=args.offscreen, silent_objects=args.silent_objects,
                       clutter=args.clutter, hum=args.hum)
    elif args.command == 'prepare':
        sys.exit(1 if prepare(args.videos, args.out, args.num_frames, args.short_side, args.workers) else 0)
    elif args.command == 'audioset':
        build_audioset(args.prepared, args.label_csv, args.out, args.balanced, args.unbalanced, args.eval_csv,
                       args.id_format, args.num_frames, not args.no_check, args.workers)
    elif args.command == 'vggsound':
        build_vggsound(args.prepared, args.csv, args.label_csv, args.out, args.id_format, args.num_frames,
                       not args.no_check, args.workers)
    elif args.command == 'shard':
        write_shards(args.data, args.out, args.shard_size, args.audio, args.seed, args.num_frames, args.workers)
    elif args.command == 'subset':
        build_subset(args.data, args.out, args.ids, args.template, args.label_csv)
    else:
        bench(args.data, args.workers, args.img_size, args.audio_length, args.num_mel_bins,
              args.batch_size, args.num_batches, args.cold, args.shuffle_buffer)
