"""Tests for data.py: features, segments, dataset modes, bad input; the synthetic clips and the loader bench."""
import json
import os
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

import data
from scripts.bench_loader import bench
from scripts.synth import make_synthetic

KALDI = dict(htk_compat=True, use_energy=False, window_type='hanning', num_mel_bins=128,
             dither=0.0, frame_shift=10)  # the releases' fbank settings, written out independently of data.py


def reference_fbank(waveform_16k):
    """Independent full computation: mean removal, kaldi fbank, pad/cut to 1024 rows."""
    w = waveform_16k - waveform_16k.mean()
    fbank = torchaudio.compliance.kaldi.fbank(w[None], sample_frequency=16000, **KALDI)
    return torch.nn.functional.pad(fbank, (0, 0, 0, max(0, 1024 - len(fbank))))[:1024]


def write_clips(root, num_clips=2, seconds=10.0, num_frames=16, labels=('a',), frame_size=40, seed=0):
    """A tiny CAV-MAE dataset: noise wavs, random frames, data.json (+ labels.csv with mids a, b)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'audio'), exist_ok=True)
    entries = []
    for k in range(num_clips):
        clip_id = f'clip{k}'
        sf.write(os.path.join(root, 'audio', f'{clip_id}.wav'),
                 rng.normal(0, 0.1, int(seconds * 16000)).astype(np.float32), 16000)
        for i in range(num_frames):
            os.makedirs(os.path.join(root, f'frame_{i}'), exist_ok=True)
            pixels = rng.integers(0, 256, (frame_size, frame_size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f'frame_{i}', f'{clip_id}.jpg'))
        entries.append(dict(video_id=clip_id, wav=f'audio/{clip_id}.wav', video_path='.',
                            labels=','.join(labels)))
    with open(os.path.join(root, 'data.json'), 'w') as f:
        json.dump({'data': entries}, f)
    with open(os.path.join(root, 'labels.csv'), 'w') as f:
        f.write('index,mid,display_name\n0,a,"Alpha, first"\n1,b,Beta\n')
    return os.path.join(root, 'data.json'), os.path.join(root, 'labels.csv')


def small(json_path, **kwargs):
    return data.AVDataset(json_path, **{'audio_length': 128, 'img_size': 32, **kwargs})


@pytest.fixture(scope='module')
def synth_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('synth'))
    make_synthetic(out, num_clips=100, seed=0)
    return out


# -----------------------------------------------------------------------------
# features and segments

def test_segment_bounds():
    # hand-computed from the frame-aligned segment formula with S=1024, T=16 (centre 64*i) and L=416
    assert data.segment_bounds(0, 16, 1024, 416) == (0, 416)  # clipped at the start
    assert data.segment_bounds(8, 16, 1024, 416) == (304, 720)  # centred on 512
    assert data.segment_bounds(15, 16, 1024, 416) == (608, 1024)  # shifted back from 1168
    assert data.segment_bounds(3, 10, 1024, 128) == (243, 371)  # centre round(307.2) = 307
    assert data.segment_bounds(5, 16, 1024, 1024) == (0, 1024)
    for L in (1, 128, 416, 1023):
        for i in range(16):
            start, end = data.segment_bounds(i, 16, 1024, L)
            assert end - start == L and 0 <= start and end <= 1024


def wav_to_fbank(waveform, sample_rate, num_mel_bins=128):
    """(N,) or (C, N) waveform -> (1024, F) un-normalised fbank, as an eval item computes it."""
    return data.fbank_frames(data.mono_16k(waveform, sample_rate), num_mel_bins)


@pytest.mark.parametrize('sample_rate,channels,seconds', [(16000, 1, 12.0), (44100, 2, 7.0), (16000, 1, 0.02)])
def test_wav_to_fbank_matches_independent_kaldi(sample_rate, channels, seconds):
    waveform = torch.randn(channels, int(sample_rate * seconds)) * 0.1 + 0.05  # with a DC offset
    first = waveform[0]
    if sample_rate != 16000:
        first = torchaudio.functional.resample(first, sample_rate, 16000)
    if len(first) < 400:  # shorter than one kaldi window: all padding
        expected = torch.zeros(1024, 128)
    else:
        expected = reference_fbank(first)
    got = wav_to_fbank(waveform if channels > 1 else waveform[0], sample_rate, 128)
    assert got.shape == (1024, 128)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('seconds', [10.0, 3.0, 4.5])
def test_segment_fbank_equals_full_computation(seconds):
    """fbank_frames over only the needed samples == the same rows of the full fbank."""
    waveform = torch.randn(int(16000 * seconds)) * 0.1
    waveform = waveform - waveform.mean()
    full = reference_fbank(waveform)
    for L in (128, 416):
        for i in (0, 7, 8, 15):
            start, end = data.segment_bounds(i, 16, 1024, L)
            # same arithmetic per row; only float32 rounding of the batched FFT/matmul may differ
            torch.testing.assert_close(data.fbank_frames(waveform, 128, start, end), full[start:end],
                                       atol=1e-3, rtol=1e-4)


def test_load_frame_resize_crop_normalise(tmp_path):
    # uniform colour: every output pixel is exactly the normalised colour
    path = str(tmp_path / 'uniform.png')
    Image.new('RGB', (90, 50), (200, 100, 30)).save(path)
    x = data.load_frame(path, 32)
    expected = (torch.tensor([200, 100, 30]) / 255 - torch.tensor(data.IMAGE_MEAN)) / torch.tensor(data.IMAGE_STD)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, expected[:, None, None].expand(3, 32, 32), atol=1e-5, rtol=0)
    # landscape red | green | blue thirds: the centre crop keeps the green third
    thirds = np.zeros((60, 180, 3), dtype=np.uint8)
    thirds[:, :60, 0], thirds[:, 60:120, 1], thirds[:, 120:, 2] = 255, 255, 255
    path = str(tmp_path / 'thirds.png')
    Image.fromarray(thirds).save(path)
    rgb = data.load_frame(path, 30) * torch.tensor(data.IMAGE_STD)[:, None, None] + torch.tensor(data.IMAGE_MEAN)[:, None, None]
    assert rgb.shape == (3, 30, 30)
    assert rgb[1, :, 3:-3].min() > 0.9 and rgb[0, :, 3:-3].max() < 0.1 and rgb[2, :, 3:-3].max() < 0.1


# -----------------------------------------------------------------------------
# dataset modes

def test_train_item_matches_independent_segment(tmp_path):
    json_path, csv_path = write_clips(str(tmp_path), num_clips=1, seconds=10.3)
    waveform, _ = sf.read(str(tmp_path / 'audio' / 'clip0.wav'), dtype='float32')
    full = reference_fbank(torch.from_numpy(waveform))
    ds = small(json_path, label_csv=csv_path, audio_length=416)
    seen = set()
    for epoch in range(200):  # until the first, a middle and the last frame were drawn
        ds.set_epoch(epoch)
        item = ds[0]
        start, end = data.segment_bounds(item['frame'], 16, 1024, 416)
        torch.testing.assert_close(item['audio'], (full[start:end] - data.FBANK_MEAN) / data.FBANK_STD,
                                   atol=1e-3, rtol=1e-4)
        seen.add(item['frame'])
        if {0, 8, 15} <= seen:
            break
    assert {0, 8, 15} <= seen
    assert item['audio'].dtype == item['image'].dtype == item['label'].dtype == torch.float32
    assert item['image'].shape == (3, 32, 32) and item['id'] == 'clip0'
    assert item['label'].tolist() == [1.0, 0.0] and ds.class_names == ['Alpha, first', 'Beta']


def test_time_shift_is_a_small_circular_shift(tmp_path):
    json_path, _ = write_clips(str(tmp_path), num_clips=1)
    waveform, _ = sf.read(str(tmp_path / 'audio' / 'clip0.wav'), dtype='float32')
    waveform = torch.from_numpy(waveform - waveform.mean())
    plain, shifted = small(json_path), small(json_path, time_shift=True)
    for epoch in range(3):
        plain.set_epoch(epoch), shifted.set_epoch(epoch)
        a, b = plain[0], shifted[0]
        assert a['frame'] == b['frame']  # the shift does not change which frame is drawn
        # the draws, in data.py's order: frame, then shift
        rng = np.random.default_rng((0, epoch, 0))
        assert int(rng.integers(16)) == b['frame']
        shift = int(rng.integers(-data.MAX_TIME_SHIFT, data.MAX_TIME_SHIFT + 1))
        start, end = data.segment_bounds(b['frame'], 16, 1024, 128)
        expected = reference_fbank(torch.roll(waveform, shift))[start:end]
        torch.testing.assert_close(b['audio'], (expected - data.FBANK_MEAN) / data.FBANK_STD, atol=1e-3, rtol=1e-4)
        assert not torch.equal(a['audio'], b['audio'])
    assert data.MAX_TIME_SHIFT <= 0.32 * 16000  # less than half the 0.64 s between frames


def test_eval_item_is_all_train_items(tmp_path):
    json_path, csv_path = write_clips(str(tmp_path), num_clips=1)
    train = small(json_path, label_csv=csv_path)
    evaluation = small(json_path, label_csv=csv_path, mode='eval')
    item = evaluation[0]
    assert item['audio'].shape == (16, 128, 128) and item['image'].shape == (16, 3, 32, 32)
    assert 'frame' not in item and item['label'].tolist() == [1.0, 0.0]
    for epoch in range(6):
        train.set_epoch(epoch)
        t = train[0]
        # the train segment reads only its samples and skips the clip-mean removal (kaldi's per-frame DC
        # removal cancels it): equal to float32 rounding
        torch.testing.assert_close(item['audio'][t['frame']], t['audio'], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(item['image'][t['frame']], t['image'])


def test_draws_pure_in_seed_epoch_index(tmp_path):
    json_path, _ = write_clips(str(tmp_path), num_clips=12, seconds=1.0, frame_size=16)
    ds = small(json_path, img_size=16)
    frames = lambda: [ds[i]['frame'] for i in range(len(ds))]
    first = frames()
    assert frames() == first  # repeatable
    ds.set_epoch(1)
    assert frames() != first  # a new epoch draws anew
    ds.set_epoch(0)
    assert frames() == first
    assert [small(json_path, img_size=16, seed=1)[i]['frame'] for i in range(12)] != first
    # independent of the number of workers (each item is a pure function of seed, epoch, index)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=data.collate)
        assert torch.cat([b['frame'] for b in loader]).tolist() == first
    # DistributedSampler: two ranks see disjoint clips that cover the dataset
    ids = []
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=data.collate)
        ids.append([i for b in loader for i in b['id']])
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 12


def test_collate_static_shapes(tmp_path):
    json_path, csv_path = write_clips(str(tmp_path), num_clips=3, seconds=2.0)
    batch = data.collate([small(json_path)[i] for i in range(3)])  # no label CSV
    assert batch['audio'].shape == (3, 128, 128) and batch['image'].shape == (3, 3, 32, 32)
    assert batch['label'].shape == (3, 0) and batch['frame'].dtype == torch.int64
    assert batch['id'] == ['clip0', 'clip1', 'clip2']
    batch = data.collate([small(json_path, label_csv=csv_path, mode='eval')[i] for i in range(2)])
    assert batch['audio'].shape == (2, 16, 128, 128) and batch['image'].shape == (2, 16, 3, 32, 32)
    assert batch['label'].shape == (2, 2) and 'frame' not in batch


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_missing_or_unreadable_files_name_file_and_clip(tmp_path, mode):
    json_path, _ = write_clips(str(tmp_path), num_clips=4, seconds=1.0, frame_size=16)
    os.remove(tmp_path / 'audio' / 'clip0.wav')
    (tmp_path / 'audio' / 'clip1.wav').write_bytes(b'not a wav file at all')
    for i in range(16):  # clip2: every frame unreadable (so train mode meets one too)
        (tmp_path / f'frame_{i}' / 'clip2.jpg').write_bytes(b'not a jpeg')
    for i in range(16):  # clip3: every frame missing
        os.remove(tmp_path / f'frame_{i}' / 'clip3.jpg')
    ds = small(json_path, mode=mode, img_size=16)
    for index, clip_id, problem, name in [(0, 'clip0', 'not found', 'clip0.wav'),
                                          (1, 'clip1', 'cannot read', 'clip1.wav'),
                                          (2, 'clip2', 'cannot read', 'clip2.jpg'),
                                          (3, 'clip3', 'not found', 'clip3.jpg')]:
        with pytest.raises(data.ClipError, match=problem) as error:
            ds[index]
        assert f"'{clip_id}'" in str(error.value) and name in str(error.value)


def test_fewer_than_T_frames(tmp_path):
    json_path, _ = write_clips(str(tmp_path), num_clips=2, seconds=1.0, num_frames=10, frame_size=16)
    ds = small(json_path, mode='eval', img_size=16)
    with pytest.raises(data.ClipError, match='frame_10'):
        ds[0]
    assert small(json_path, mode='eval', img_size=16, num_frames=10)[0]['image'].shape == (10, 3, 16, 16)


def test_skip_bad_drops_counts_and_lists(tmp_path, capsys):
    json_path, _ = write_clips(str(tmp_path), num_clips=5, seconds=1.0, frame_size=16)
    os.remove(tmp_path / 'audio' / 'clip1.wav')
    (tmp_path / 'frame_3' / 'clip2.jpg').write_bytes(b'garbage')
    os.remove(tmp_path / 'frame_15' / 'clip4.jpg')  # fewer than T frames
    bad_list = str(tmp_path / 'bad.txt')
    ds = small(json_path, img_size=16, skip_bad=True, bad_list=bad_list)
    assert [c['id'] for c in ds.clips] == ['clip0', 'clip3'] and len(ds) == 2
    assert 'skipped 3 of 5 clips' in capsys.readouterr().out
    assert open(bad_list).read().split() == ['clip1', 'clip2', 'clip4']
    ds[0], ds[1]
    # default list next to the JSON
    small(json_path, img_size=16, skip_bad=True)
    assert open(str(tmp_path / 'data.bad.txt')).read().split() == ['clip1', 'clip2', 'clip4']


def test_wrong_labels_and_empty_json(tmp_path):
    json_path, csv_path = write_clips(str(tmp_path), num_clips=2, seconds=1.0, labels=('a', 'zzz'), frame_size=16)
    with pytest.raises(ValueError, match=r"clip 'clip0' has unknown label ids \['zzz'\]"):
        small(json_path, label_csv=csv_path)
    assert small(json_path)[0]['label'].shape == (0,)  # labels are ignored without a CSV
    json.dump({'data': [dict(video_id='x', wav='a.wav', video_path='.', labels='')]}, open(json_path, 'w'))
    with pytest.raises(ValueError, match="clip 'x' has no labels"):
        small(json_path, label_csv=csv_path, require_labels=True)
    json.dump({'data': [dict(video_id='x', video_path='.')]}, open(json_path, 'w'))
    with pytest.raises(ValueError, match=r"entry 0 lacks \['wav'\]"):
        small(json_path)
    json.dump({'data': []}, open(json_path, 'w'))
    with pytest.raises(ValueError, match='lists no clips'):
        small(json_path)


def test_pretraining_needs_no_labels_probing_does(tmp_path):
    # prepare writes empty labels and the shipped configs set label_csv: training must still load
    json_path, csv_path = write_clips(str(tmp_path), num_clips=3, seconds=1.0, labels=(), frame_size=16)
    entries = json.load(open(json_path))['data']
    entries[1]['labels'], entries[2]['labels'] = 'b', 'b, a'
    json.dump({'data': entries}, open(json_path, 'w'))
    for mode in ('train', 'eval'):
        ds = small(json_path, label_csv=csv_path, mode=mode, img_size=16)
        assert [ds[i]['label'].tolist() for i in range(3)] == [[0, 0], [0, 1], [1, 1]]
        # a clip keeps class indices, not a (num_classes,) vector (AudioSet-2M: 4 GB of them)
        assert [c['classes'] for c in ds.clips] == [[], [1], [0, 1]]
    import evaluate  # probing / embedding plots: labels required, the error names the clip
    config = types.SimpleNamespace(audio_length=128, num_mel_bins=128, img_size=16)
    with pytest.raises(ValueError, match="clip 'clip0' has no labels"):
        evaluate.make_dataset(json_path, csv_path, config)
    assert len(evaluate.make_dataset(json_path, None, config)) == 3  # retrieval without a CSV


def test_short_clips_are_padded(tmp_path):
    json_path, _ = write_clips(str(tmp_path), num_clips=1, seconds=1.0, frame_size=16)
    item = small(json_path, mode='eval', img_size=16)[0]  # 1 s of audio: 98 fbank rows
    padding = (0 - data.FBANK_MEAN) / data.FBANK_STD
    assert item['audio'].shape == (16, 128, 128)
    assert (item['audio'][0, :98] != padding).all() and (item['audio'][0, 98:] == padding).all()
    assert (item['audio'][15] == padding).all()  # the last segment lies past the audio
    sf.write(str(tmp_path / 'audio' / 'clip0.wav'), np.zeros(100, dtype=np.float32), 16000)
    assert (small(json_path, mode='eval', img_size=16)[0]['audio'] == padding).all()  # < one window
    sf.write(str(tmp_path / 'audio' / 'clip0.wav'), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(data.ClipError, match='no samples'):
        small(json_path, img_size=16)[0]


# -----------------------------------------------------------------------------
# synthetic data

def test_synth_deterministic(tmp_path):
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        make_synthetic(str(tmp_path / name), num_clips=20, seed=seed, num_classes=4)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / 'a')
                   for d, _, fs in os.walk(tmp_path / 'a') for f in fs)
    assert len(files) == 5 + 20 * 33  # train/eval JSON, CSV, meta, config, and per clip a wav, 16 frames, 16 masks
    read = lambda name, f: open(os.path.join(tmp_path, name, f), 'rb').read()
    assert all(read('a', f) == read('b', f) for f in files)
    assert read('a', 'audio/syn00000.wav') != read('c', 'audio/syn00000.wav')
    assert read('a', 'frame_0/syn00000.jpg') != read('c', 'frame_0/syn00000.jpg')


def test_synth_balanced_split(synth_dir):
    splits = {s: json.load(open(os.path.join(synth_dir, f'{s}.json')))['data'] for s in ('train', 'eval')}
    assert len(splits['eval']) == 20 and len(splits['train']) == 80
    assert not {e['video_id'] for e in splits['train']} & {e['video_id'] for e in splits['eval']}
    for entries, per_class in ((splits['train'], 8), (splits['eval'], 2)):
        labels = [e['labels'] for e in entries]
        assert sorted(set(labels)) == [f'syn_{c}' for c in range(10)]
        assert all(labels.count(l) == per_class for l in set(labels))
    ds = data.AVDataset(os.path.join(synth_dir, 'eval.json'), os.path.join(synth_dir, 'labels.csv'),
                        mode='eval', audio_length=128, img_size=64)
    assert ds.num_classes == 10 and ds[0]['audio'].shape == (16, 128, 128)


@pytest.fixture(scope='module')
def synth_clips(synth_dir):
    """Per clip of the synthetic set: split, class, on/off pattern (16,), fbank (1024, 128),
    frames (16, S, S, 3) in [0, 1]."""
    meta = json.load(open(os.path.join(synth_dir, 'synth_meta.json')))
    clips = []
    for split in ('train', 'eval'):
        for e in json.load(open(os.path.join(synth_dir, f'{split}.json')))['data']:
            waveform, sr = sf.read(os.path.join(synth_dir, e['wav']), dtype='float32')
            frames = [np.asarray(Image.open(data.frame_path(synth_dir, i, e['video_id'])), dtype=np.float32) / 255
                      for i in range(16)]
            clips.append(dict(split=split, cls=int(e['labels'].split('_')[1]), on=np.array(meta[e['video_id']]['on'], bool),
                              fbank=wav_to_fbank(torch.from_numpy(waveform), sr, 128), frames=np.stack(frames)))
    return clips


def test_synth_signal_nearest_centroid(synth_clips):
    """Nearest-centroid classifiers on raw clip features beat chance (0.1) on the held-out split:
    audio: time-averaged fbank minus its overall level (spectral shape);
    image: mean colour of the coloured pixels (saturation > 0.4; backgrounds are near-grey)."""
    def audio_feature(clip):
        fbank = clip['fbank'][:1000]  # (1000, 128) the 10 s of audio
        return (fbank.mean(0) - fbank.mean()).numpy()

    def image_feature(clip):
        rgb = clip['frames']  # (16, S, S, 3)
        return rgb[(rgb.max(-1) - rgb.min(-1)) > 0.4].mean(0)

    for feature, name in ((audio_feature, 'fbank energy'), (image_feature, 'colour')):
        x = {s: np.stack([feature(c) for c in synth_clips if c['split'] == s]) for s in ('train', 'eval')}
        x = {s: v / np.linalg.norm(v, axis=1, keepdims=True) for s, v in x.items()}  # (N, D) unit rows
        y = {s: np.array([c['cls'] for c in synth_clips if c['split'] == s]) for s in ('train', 'eval')}
        centroids = np.stack([x['train'][y['train'] == c].mean(0) for c in range(10)])  # (10, D)
        predicted = ((x['eval'][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        accuracy = (predicted == y['eval']).mean()
        assert accuracy >= 0.5, f'{name}: held-out accuracy {accuracy:.2f} (chance 0.1)'


def test_synth_frame_level_alignment(synth_clips):
    """Object frames and their audio segments carry the event; the other frames do not."""
    ok_audio = ok_image = 0
    for clip in synth_clips:
        on = clip['on']
        # fbank energy in the 0.2 s around each frame's moment; coloured-pixel fraction of each frame
        energy = np.array([clip['fbank'][slice(*data.segment_bounds(i, 16, 1024, 20))].mean() for i in range(16)])
        rgb = clip['frames']
        coloured = ((rgb.max(-1) - rgb.min(-1)) > 0.4).mean((1, 2))  # (16,)
        ok_audio += energy[on].min() > energy[~on].max() - 0.5  # slack for noise clicks in off slots
        ok_image += coloured[on].min() > coloured[~on].max()
    assert ok_audio >= 0.9 * len(synth_clips) and ok_image == len(synth_clips)


# -----------------------------------------------------------------------------
# the loader benchmark

def test_bench_prints_throughput(synth_dir, capsys):
    per_second = bench(os.path.join(synth_dir, 'train.json'), workers=0, img_size=64,
                            audio_length=128, batch_size=4, num_batches=3)
    out = capsys.readouterr().out
    assert per_second > 0 and 'items/s per worker' in out and '12 items' in out


# -----------------------------------------------------------------------------
# loader speed-ups: exact where it matters

@pytest.mark.parametrize('seconds', [10.3, 3.0])
def test_segment_read_equals_rolled_full_waveform_and_reads_only_the_slice(tmp_path, monkeypatch, seconds):
    rng = np.random.default_rng(1)
    samples = (rng.normal(0, 0.1, int(16000 * seconds)) + 0.03).astype(np.float32)  # with a DC offset
    path = str(tmp_path / 'a.wav')
    sf.write(path, samples, 16000, subtype='FLOAT')
    read_sizes = []
    original_read = sf.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        out = original_read(self, frames, *args, **kwargs)
        read_sizes.append(len(out))
        return out
    monkeypatch.setattr(sf.SoundFile, 'read', counting_read)
    waveform = torch.from_numpy(samples)
    for frame in (0, 8, 15):
        start, end = data.segment_bounds(frame, 16, 1024, 416)
        for shift in (-data.MAX_TIME_SHIFT, 0, 1234, data.MAX_TIME_SHIFT):  # first/last segments wrap
            read_sizes.clear()
            got = data.load_segment_fbank(path, 'a', 128, start, end, shift)
            expected = reference_fbank(torch.roll(waveform, shift))[start:end]
            torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
            rows = min(end, 1 + (len(samples) - data.WINDOW) // data.HOP) - start  # rows with audio
            assert sum(read_sizes) == ((rows - 1) * data.HOP + data.WINDOW if rows > 0 else 0)  # those samples only


def test_segment_read_other_rates_and_channels(tmp_path):
    rng = np.random.default_rng(2)
    stereo = rng.normal(0, 0.1, (44100 * 6, 2)).astype(np.float32)
    path = str(tmp_path / 'b.wav')
    sf.write(path, stereo, 44100, subtype='FLOAT')
    start, end = data.segment_bounds(3, 16, 1024, 416)
    expected = wav_to_fbank(torch.from_numpy(stereo.T.copy()), 44100)  # first channel, resampled
    got = data.load_segment_fbank(path, 'b', 128, start, end, 0)
    torch.testing.assert_close(got, expected[start:end], atol=1e-3, rtol=1e-4)
    with pytest.raises(data.ClipError, match="clip 'c'.*not found"):
        data.load_segment_fbank(str(tmp_path / 'missing.wav'), 'c', 128, start, end)


def test_jpeg_draft_decodes_smaller_and_stays_close(tmp_path, monkeypatch):
    # a smooth 896x504 photo-like frame: draft decoding at 1/2 scale (448x252 still covers 398x224)
    yy, xx = np.mgrid[0:504, 0:896]
    pixels = np.stack([128 + 100 * np.sin(xx / 37.0), 128 + 90 * np.cos(yy / 23.0), (xx + yy) % 256], -1)
    path = str(tmp_path / 'big.jpg')
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=92)
    sizes = []
    original_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, 'resize', lambda self, *a, **k: sizes.append(self.size) or original_resize(self, *a, **k))
    exact, drafted = data.load_frame(path, 224), data.load_frame(path, 224, draft=True)
    assert sizes == [(896, 504), (448, 252)]
    levels = ((exact - drafted) * torch.tensor(data.IMAGE_STD)[:, None, None] * 255).abs()  # in 0..255 levels
    assert drafted.shape == exact.shape == (3, 224, 224)
    assert levels.mean() < 1.5, levels.mean()
    # frames prepared at the target size decode in full either way
    small_path = str(tmp_path / 'small.jpg')
    Image.fromarray(pixels[:224, :398].astype(np.uint8)).save(small_path, quality=92)
    assert torch.equal(data.load_frame(small_path, 224), data.load_frame(small_path, 224, draft=True))
