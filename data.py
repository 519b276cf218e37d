"""
Data for TG-DP: the CAV-MAE dataset layout -> training / evaluation batches (CAV-MAE Sync's input
pipeline), and tar shards (webdataset convention) read back as items or as a training stream.

Layout (CAV-MAE): a JSON {"data": [{"video_id", "wav", "video_path", "labels"}]}, frame i of a clip
at {video_path}/frame_{i}/{video_id}.jpg, labels = comma-separated `mid`s of a CSV with header
index,mid,display_name; relative paths are resolved against the JSON's folder (object masks: see
scripts/localize.py). scripts/ writes these files: synth.py, prepare.py, splits.py, shard.py.
"""

import csv
import functools
import io
import json
import os
import re
import signal
import sys
from collections import OrderedDict

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from tqdm import tqdm


def torchaudio_error(error):
    """Why torchaudio did not load, for a person: in practice a wheel built for another torch (its
    native library then misses a symbol), so name the installed pair and the pinned one."""
    from importlib import metadata
    def version(name):
        try:
            return f'{name} {metadata.version(name)}'
        except metadata.PackageNotFoundError:
            return f'{name} not installed'
    installed = [version(name) for name in ('torch', 'torchaudio')]
    requirements = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'requirements.txt')
    pins = [line.strip() for line in open(requirements) if line.startswith(('torch=', 'torchaudio='))]
    return (f"error: torchaudio does not load ({type(error).__name__}: {error})\n"
            f"installed: {' with '.join(installed)}; this project pins {' with '.join(pins)}. A "
            f"torchaudio wheel only loads with the torch it was built for: run `pip install -r "
            f"requirements.txt` in a new virtual environment.")


try:
    import torchaudio
except (ImportError, OSError) as e:  # OSError: libtorchaudio.so built against another torch
    sys.exit(torchaudio_error(e))

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


class ClipError(RuntimeError):
    """A clip's wav or frame is missing or unreadable; the message names the file and the clip."""


def opened(path, kind, open_file, clip_id=None):
    """open_file(path) for a clip's `kind` ('wav', 'frame') file, a path or a ShardMember (read from
    its start); ClipError naming the file (and clip_id, if given) if it is missing or unreadable."""
    prefix = '' if clip_id is None else f"clip '{clip_id}': "
    if isinstance(path, str) and not os.path.isfile(path):
        raise ClipError(f"{prefix}{kind} file not found: {path}")
    try:
        if not isinstance(path, str):
            path.seek(0)
        return open_file(path)
    except Exception as e:
        raise ClipError(f"{prefix}cannot read {kind} file {path}: {e}") from e


def open_wav(path, clip_id=None):
    """opened's soundfile.SoundFile of a wav; ClipError also if it has no samples."""
    f = opened(path, 'wav', sf.SoundFile, clip_id)
    if f.frames == 0:
        f.close()
        prefix = '' if clip_id is None else f"clip '{clip_id}': "
        raise ClipError(f"{prefix}wav file has no samples: {path}")
    return f


def image_file(path):  # a frame for Image.open: a path, or a ShardMember's bytes
    return path if isinstance(path, str) else io.BytesIO(path.readall())


# -----------------------------------------------------------------------------
# audio and frame features (pure functions, reused by other scripts)

def segment_bounds(i, num_frames, num_fbank_frames, length):
    """fbank rows [start, end) of the segment centred on frame i of num_frames (CAV-MAE Sync)."""
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
    samples, read(a, b) -> its samples [a, b). Kaldi frame k reads only samples [k*HOP, k*HOP +
    WINDOW) (snip_edges, per-frame DC removal and pre-emphasis), so reading just what the rows need
    gives the full result (only float32 rounding of the batched FFT may differ, ~1e-5 relative)."""
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


def load_waveform(path, clip_id):
    """wav file (a path or a ShardMember) -> (N,) float32 first channel at 16 kHz, mean removed."""
    read = functools.partial(sf.read, dtype='float32', always_2d=True)
    samples, sample_rate = opened(path, 'wav', read, clip_id)  # (N, C)
    if len(samples) == 0:
        raise ClipError(f"clip '{clip_id}': wav file has no samples: {path}")
    return mono_16k(torch.from_numpy(samples[:, 0]), sample_rate)


def load_segment_fbank(path, clip_id, num_mel_bins, start, end, shift=0):
    """fbank rows [start, end) of a wav (a path or a ShardMember) rolled by shift samples
    (torch.roll: the train-time shift), reading only the samples those rows need from a 16 kHz file
    (4.2 s of a 10 s clip for 416 rows); other rates are read whole and resampled. The clip mean is
    not removed: kaldi's per-frame DC removal cancels it, so the rows equal load_waveform's (to
    float32 rounding)."""
    with open_wav(path, clip_id) as f:
        num_samples = f.frames
        if f.samplerate != SAMPLE_RATE:
            waveform = torch.roll(load_waveform(path, clip_id), shift)
            return fbank_frames(waveform, num_mel_bins, start, end)

        def read(a, b):  # samples [a, b) of the rolled waveform: source from (a - shift) mod N on
            src, pieces = (a - shift) % num_samples, []
            try:
                f.seek(src)
                n = min(b - a, num_samples - src)
                pieces.append(f.read(n, dtype='float32', always_2d=True)[:, 0])
                if b - a > n:  # the roll wrapped: the rest from the start of the file
                    f.seek(0)
                    n = b - a - len(pieces[0])
                    pieces.append(f.read(n, dtype='float32', always_2d=True)[:, 0])
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


def fit_frame(img, img_size, resample, geometry='crop', size=None):
    """PIL image -> (img_size, img_size). 'crop': shorter side to img_size (size: resized_size),
    centre crop as torchvision's CenterCrop (the training and evaluation pipeline); 'full': the
    whole frame resized, as the Flickr-SoundNet / VGG-SS localisation code (EZ-VSL) does."""
    if geometry == 'full':
        return img.resize((img_size, img_size), resample)
    if geometry != 'crop':
        raise ValueError(f"geometry must be 'crop' or 'full', got {geometry!r}")
    size = size or resized_size(*img.size, img_size)
    img = img.resize(size, resample)  # a no-op copy when already that size
    left, top = int(round((size[0] - img_size) / 2.0)), int(round((size[1] - img_size) / 2.0))
    return img.crop((left, top, left + img_size, top + img_size))


def load_frame(path, img_size, clip_id='', draft=False, geometry='crop'):
    """JPEG (a path or a ShardMember) -> (3, img_size, img_size) normalised, bicubic, fit_frame's
    geometry. draft: let the JPEG decoder scale by 1/2, 1/4 or 1/8 where the result still covers the
    target: a 1280x720 frame loads 2.4x faster, within 0.75 of 255 levels on average (measured on a
    sample video); no effect on frames prepared at 224 px."""
    def decode(path):
        with Image.open(image_file(path)) as img:
            size = resized_size(*img.size, img_size)  # of the full frame, also when drafted
            if draft:
                img.draft('RGB', size)
            return img.convert('RGB'), size
    img, size = opened(path, 'frame', decode, clip_id)
    img = fit_frame(img, img_size, Image.BICUBIC, geometry, size)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()  # (3, H, W) in 0..255 (writable)
    scale = 255.0 * torch.tensor(IMAGE_STD)[:, None, None]
    return x.sub_(255.0 * torch.tensor(IMAGE_MEAN)[:, None, None]).div_(scale)  # in place


def frame_path(video_path, i, clip_id):
    return os.path.join(video_path, f'frame_{i}', f'{clip_id}.jpg')


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
    """'mid1,mid2' -> sorted class indices; [] without a label CSV (empty mid_to_index). A clip
    keeps its indices, not a multi-hot vector: 2 M AudioSet clips x 527 classes: 4 GB float32."""
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
    """A dataset JSON or a shard set -> list of dicts id, index, labels, and either wav + video_path
    (files) or tar + offset + end (a clip's members in a shard), in index order: the clip's position
    in the JSON (for shards: in the JSON they were packed from)."""
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
                          wav=os.path.join(root, entry['wav']),
                          video_path=os.path.join(root, entry['video_path'])))
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
        open_wav(clip_wav(clip)).close()
        for i in range(num_frames):
            opened(clip_frame(clip, i), 'frame', lambda f: Image.open(image_file(f)).close())
    except ClipError as e:
        return str(e)
    return None


def with_members(clip):
    """A shard clip with its members' headers read (once per item); a file clip as it is."""
    if 'tar' in clip and 'members' not in clip:
        return dict(clip, members=tar_members(clip['tar'], clip['offset'], clip['end']))
    return clip


def eval_inputs(clip, img_size, num_frames, geometry='crop'):
    """A clip's whole waveform (n,) (16 kHz, mean removed) and its num_frames frames (T, 3, H, W),
    from files or a shard: an eval item's inputs (AVDataset's, and the probe's augmented clips)."""
    clip = with_members(clip)
    waveform = load_waveform(clip_wav(clip), clip['id'])
    frames = [load_frame(clip_frame(clip, i), img_size, clip['id'], geometry=geometry) for i in range(num_frames)]
    return waveform, torch.stack(frames)


def eval_segments(waveform, num_frames, audio_length, num_mel_bins):
    """Waveform (n,) -> its T frame-aligned fbank segments (T, L, F), normalised: one fbank per clip."""
    fbank = fbank_frames(waveform, num_mel_bins)  # (1024, F)
    audio = torch.stack([fbank[slice(*segment_bounds(i, num_frames, TARGET_FRAMES, audio_length))]
                         for i in range(num_frames)])  # (T, L, F)
    return (audio - FBANK_MEAN) / FBANK_STD


def load_item(clip, mode, epoch, seed, audio_length, num_mel_bins, img_size, num_frames,
              time_shift, geometry='crop'):
    """One clip (a row of read_clip_table) -> AVDataset's item without its label. Train mode draws
    the frame and the time shift from (seed, epoch, clip index): a pure function, so the same clip
    gives the same item from files or shards, in any worker, rank, or order."""
    T, L = num_frames, audio_length
    clip = with_members(clip)
    if mode != 'train':
        waveform, image = eval_inputs(clip, img_size, T, geometry)
        return dict(id=clip['id'], audio=eval_segments(waveform, T, L, num_mel_bins), image=image)
    rng = np.random.default_rng((seed, epoch, clip['index']))
    frame = int(rng.integers(T))
    shift = int(rng.integers(-MAX_TIME_SHIFT, MAX_TIME_SHIFT + 1)) if time_shift else 0
    start, end = segment_bounds(frame, T, TARGET_FRAMES, L)
    audio = load_segment_fbank(clip_wav(clip), clip['id'], num_mel_bins, start, end, shift)  # (L, F)
    # JPEG draft decoding for training only: evaluation decodes in full, as the reference pipeline
    image = load_frame(clip_frame(clip, frame), img_size, clip['id'], draft=True)
    return dict(id=clip['id'], frame=frame, audio=(audio - FBANK_MEAN) / FBANK_STD, image=image)


class AVDataset(torch.utils.data.Dataset):
    """CAV-MAE JSON or a shard set (+ optional label CSV) -> items (CAV-MAE Sync's input pipeline):
    train: audio (L, F), image (3, H, W), frame (int, from (seed, epoch, clip index)), label, id
    eval:  audio (T, L, F), image (T, 3, H, W), label, id  (one fbank per clip, T segments)
    data_json: a dataset JSON or shards of `scripts/shard.py` (is_shard_set), giving the same items.
    label: multi-hot (num_classes,), all 0 for a clip without labels unless require_labels (probing
    needs them); label ids not in the CSV are always an error. geometry (eval mode): 'crop' or 'full'
    (fit_frame). skip_bad=True checks every file at start-up, drops clips with a missing or unreadable
    wav/frame and writes their ids to bad_list (default <json name>.bad.txt beside the JSON; '' writes
    and prints nothing); else such a clip raises ClipError when loaded."""

    def __init__(self, data_json, label_csv=None, mode='train', audio_length=416,
                 num_mel_bins=128, img_size=224, num_frames=16, time_shift=False, seed=0,
                 skip_bad=False, bad_list=None, require_labels=False, geometry='crop'):
        if mode not in ('train', 'eval'):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not 0 < audio_length <= TARGET_FRAMES:
            raise ValueError(f"audio_length must be in 1..{TARGET_FRAMES}, got {audio_length}")
        self.mode, self.audio_length, self.num_mel_bins = mode, audio_length, num_mel_bins
        self.img_size, self.num_frames = img_size, num_frames
        self.time_shift, self.seed, self.epoch = time_shift, seed, 0
        if geometry not in ('crop', 'full') or (geometry == 'full' and mode == 'train'):
            raise ValueError(f"geometry must be 'crop' or, in eval mode, 'full'; got {geometry!r} ({mode})")
        self.geometry = geometry
        self.clips = read_clip_table(data_json)
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
                         self.num_mel_bins, self.img_size, self.num_frames, self.time_shift,
                         self.geometry)
        item['label'] = multi_hot(clip['classes'], self.num_classes)
        return item


def collate(items):
    """items -> batch: audio, image, label stacked (B, ...), frame (B,) (train mode), ids."""
    batch = {key: torch.stack([item[key] for item in items]) for key in ('audio', 'image', 'label')}
    batch['id'] = [item['id'] for item in items]
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
MAX_OPEN_SHARDS = 64  # descriptors kept open per process (least recently used closed first)
_shard_fds, _shard_fds_pid = OrderedDict(), None


def shard_fd(path):
    """A read-only descriptor of a shard, opened once per process (a forked worker opens its own)"""
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
    os.pread: no shared file position, so soundfile and Pillow read it as a file in any worker."""

    def __init__(self, tar, name, offset, size):
        super().__init__()
        self.tar, self.name, self.offset, self.size, self.pos = tar, name, offset, size, 0

    def __str__(self):
        return f'{self.name} in {self.tar}'

    def readable(self):
        return True

    def seekable(self):
        return True

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

    readall = read  # read() reads to the end


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
            checksum = sum(block[:148]) + 8 * 32 + sum(block[156:])  # the field counts as spaces
            if int(block[148:156].strip(b'\0 ') or b'0', 8) != checksum:
                raise ValueError('bad checksum')
            size = int(block[124:136].strip(b'\0 ') or b'0', 8)
            name = block[:100].split(b'\0', 1)[0].decode()
            prefix = block[345:500].split(b'\0', 1)[0].decode()
        except ValueError as e:
            raise ClipError(f"{tar}: no valid tar header at byte {pos} ({e})") from e
        if block[156:157] not in (b'0', b'\0'):
            raise ClipError(f"{tar}: member {name!r} at byte {pos} is not a plain file "
                            f"(only ustar shards as `scripts/shard.py` writes them are read)")
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
    """The clips whose headers lie in bytes [start, end) of a shard (default: all), in tar order ->
    dicts key, id, labels, index (from key.json), offset, end, members [(name, offset, size)]."""
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
            raise ClipError(f"{tar}: clip {clip['key']}: unreadable {clip['key']}.json ({e})") from e
        clip.update(id=meta['id'], labels=meta.get('labels', ''), index=meta['index'])
    return clips


def expand_braces(pattern):
    """'DIR/shards-{00000..00002}.tar' -> the 3 paths (ranges keep zero padding; '{a,b}' too)."""
    m = re.search(r'\{([^{}]*)\}', pattern)
    if not m:
        return [pattern]
    r = re.fullmatch(r'(\d+)\.\.(\d+)', m.group(1))
    if r:
        items = [str(i).zfill(len(r[1])) for i in range(int(r[1]), int(r[2]) + 1)]
    else:
        items = m.group(1).split(',')
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for item in items for p in expand_braces(head + item + tail)]


def is_shard_set(spec):
    """A shard folder, a .tar or brace pattern, or an index.json written by `scripts/shard.py`."""
    spec = str(spec)
    if os.path.isdir(spec) or spec.endswith('.tar') or '{' in spec:
        return True
    if spec.endswith('.json') and os.path.isfile(spec):
        with open(spec) as f:
            return f'"format": "{SHARD_FORMAT}"' in f.read(100)  # index.json starts with it
    return False


def shard_tables(spec):
    """A shard set -> [(shard path, [index.json rows: key, id, labels, index, offset, end])], from
    the index.json that `scripts/shard.py` writes beside the shards."""
    spec = str(spec)
    paths = None if os.path.isdir(spec) or spec.endswith('.json') else expand_braces(spec)
    index_path = spec if spec.endswith('.json') else os.path.join(
        spec if paths is None else os.path.dirname(paths[0]), 'index.json')
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{index_path} not found: shards are read through the index.json "
                                f"that `scripts/shard.py` writes beside them")
    with open(index_path) as f:
        index = json.load(f)
    if not index.get('complete'):
        raise ValueError(f"{index_path}: the shards are still being written (or the run stopped): "
                         f"run `scripts/shard.py` again to finish them")
    root = os.path.dirname(os.path.abspath(index_path))
    tables = {os.path.join(root, s['name']): s['clips'] for s in index['shards']}
    for path in paths or tables:
        if not os.path.isfile(path) or os.path.abspath(path) not in tables:
            raise FileNotFoundError(f"shard {path} not found or not in {index_path}")
    return [(path, tables[os.path.abspath(path)]) for path in paths or tables]


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
    batch (listed in batch['skipped']): the batch keeps its size, so every rank stays in step."""
    good = [item for item in items if 'error' not in item]
    errors = [item['error'] for item in items if 'error' in item]
    if not good:
        raise ClipError('every clip of a batch is unreadable: ' + '; '.join(errors))
    batch = collate([good[n % len(good)] if 'error' in item else item for n, item in enumerate(items)])
    batch['skipped'] = errors
    return batch


def ignore_sigterm(_):  # loader workers: the main process handles pre-emption and shuts them down
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainBatches:
    """What ShardStream and FileBatches share: the batch count and the loader on the device."""

    def batches_per_epoch(self, epoch):
        """Micro-batches each rank takes in an epoch (the same on every rank; cheap): its share,
        clips // world_size as DistributedSampler(drop_last=True) cuts it, in whole optimiser steps
        of `accumulation` batches; less than one global batch is left out."""
        B = batch_size_of(self.batch_size, epoch)
        return self.clips // self.world_size // (B * self.accumulation) * self.accumulation

    def device_batches(self, device, **loader_args):
        """DataLoader(self)'s batches -> (audio, image) on the device; skipped clips are counted."""
        loader = torch.utils.data.DataLoader(self, num_workers=self.num_workers,
                                             pin_memory=device.startswith('cuda'),
                                             worker_init_fn=ignore_sigterm, **loader_args)
        for batch in loader:
            for error in batch['skipped']:
                self.skipped += 1
                print(f'skip_bad: skipped an unreadable clip: {error}', file=sys.stderr)
            audio = batch['audio'].to(device, non_blocking=True)  # (B, L, F)
            yield audio, batch['image'].to(device, non_blocking=True)  # (B, 3, H, W)


class ShardStream(TrainBatches, torch.utils.data.IterableDataset):
    """Training batches from a shard set, endless across epochs, each reader reading its clips in
    order (sequential reads). In epoch e, with W = max(1, num_workers) readers per rank:
    - the shards in a permutation from (seed, e), each in tar order, make one sequence of all N
      clips; rank r takes N // world_size of them from r * (N // world_size) on, in
      batches_per_epoch(e) batches of batch_size_of(batch_size, e);
    - batch g of a rank (numbered across epochs) comes from reader role g mod W, as the DataLoader
      takes batches from its workers in turn; each role reads a contiguous run of the rank's clips
      (each by its byte range, whatever the shard boundaries) through a shuffle buffer of
      shuffle_buffer clips seeded from (seed, e, rank, role).
    Items are AVDataset's train items of the JSON the shards were packed from (no labels: pretraining
    reads none); a batch is collate_readable's plus 'epoch' and 'batch' (its place in the rank's
    epoch). start=(epoch, k) begins at batch k with exactly the batches an uninterrupted stream yields
    from there, given the same layout() (train.py compares it with the checkpoint's)."""

    def __init__(self, shards, batch_size, seed=0, rank=0, world_size=1, num_workers=0, start=(0, 0),
                 shuffle_buffer=1000, audio_length=416, num_mel_bins=128, img_size=224, num_frames=16,
                 time_shift=False, accumulation=1, skip_bad=False):
        tables = shard_tables(shards)
        self.shards = [(path, len(rows)) for path, rows in tables]
        # clip c of shard s: bytes [starts[s][c], starts[s][c + 1]); arrays, light to fork
        self.starts = [np.array([row[4] for row in rows] + [rows[-1][5] if rows else 0],
                                dtype=np.int64) for _, rows in tables]
        self.clips = sum(n for _, n in self.shards)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.accumulation, self.skip_bad, self.skipped = accumulation, skip_bad, 0
        self.item_args = dict(audio_length=audio_length, num_mel_bins=num_mel_bins,
                              img_size=img_size, num_frames=num_frames, time_shift=time_shift)
        self.set_start(*start)

    def set_start(self, epoch, k):
        """Begin at batch k of epoch `epoch` (before making the DataLoader: workers copy it)."""
        if not 0 <= k < self.batches_per_epoch(epoch):
            raise ValueError(f"start batch {k} is outside epoch {epoch} ({self.batches_per_epoch(epoch)} batches)")
        self.start = (epoch, k)

    def layout(self):
        """What a mid-epoch resume must find unchanged (save it with the checkpoint)."""
        return dict(shards=[[os.path.basename(p), n] for p, n in self.shards], seed=self.seed,
                    shuffle_buffer=self.shuffle_buffer, world_size=self.world_size,
                    num_workers=self.num_workers)

    def role_batches(self, epoch, role):
        """[(k, sequence positions of its clips)] for the batches k of the rank's epoch that reader
        role makes, in order; positions only (nothing is read)."""
        W, B = max(1, self.num_workers), batch_size_of(self.batch_size, epoch)
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
        clips = scan_shard(path, offset, end)
        if len(clips) != 1:
            raise ClipError(f"{path}: bytes {offset}..{end} hold {len(clips)} clips where its "
                            f"index.json has one: re-run the shard writer")
        item = load_item(clips[0], 'train', epoch, self.seed, **self.item_args)
        return dict(item, label=torch.zeros(0))

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
                items = [readable_or_error(functools.partial(self.load, epoch, p), self.skip_bad) for p in positions]
                batch = collate_readable(items)
                batch['epoch'], batch['batch'] = epoch, number
                yield batch
            epoch, k = epoch + 1, 0

    def loader(self, epoch, batch, device):
        """(audio, image) batches on the device from batch `batch` of `epoch` on, endless."""
        self.set_start(epoch, batch)
        yield from self.device_batches(device, batch_size=None)

    def read_ahead(self, epoch, positions, advised):
        """Ask the kernel to read the shards of these clips ahead, in the background (once each)."""
        for p in positions:
            path = self.byte_range(epoch, p)[0]
            if (epoch, path) not in advised:
                advised.add((epoch, path))
                os.posix_fadvise(shard_fd(path), 0, 0, os.POSIX_FADV_WILLNEED)


class FileBatches(TrainBatches):
    """Training batches of an AVDataset read by random access: epoch e is DistributedSampler's
    share of a permutation from (seed, e), in batches_per_epoch(e) batches. Items are a pure
    function of (seed, epoch, clip index), so one loader serves every epoch."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, num_workers=0, accumulation=1,
                 seed=0, skip_bad=False):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.clips, self.world_size, self.seed = len(dataset), world_size, seed
        self.accumulation, self.skip_bad, self.skipped = accumulation, skip_bad, 0
        self.sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True,
                                                           seed=seed, drop_last=True)

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
        yield from self.device_batches(device, batch_sampler=self.batch_keys(epoch, batch),
                                       collate_fn=collate_readable)


def train_batches(spec, batch_size, seed=0, rank=0, world_size=1, num_workers=0, accumulation=1,
                  shuffle_buffer=1000, skip_bad=False, bad_list=None, **item_args):
    """Pretraining batches, one interface for every source: a shard set -> ShardStream, a dataset
    JSON -> FileBatches (skip_bad: as AVDataset's at start-up, then a clip unreadable mid-run is
    replaced in its batch, collate_readable). Each has clips, batches_per_epoch(epoch), layout()
    (for the checkpoint), loader(epoch, batch, device) and skipped (the count skipped mid-run)."""
    if is_shard_set(spec):
        return ShardStream(spec, batch_size, seed=seed, rank=rank, world_size=world_size,
                           num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                           accumulation=accumulation, skip_bad=skip_bad, **item_args)
    dataset = AVDataset(spec, mode='train', seed=seed, skip_bad=skip_bad, bad_list=bad_list, **item_args)
    return FileBatches(dataset, batch_size, rank, world_size, num_workers, accumulation, seed, skip_bad)
