"""scripts/synth.py synthetic clips: the semantic-noise options change only what they name, and the object masks
mark exactly the sounding object's pixels (in the files and through scripts/localize.py's MaskedClips)."""
import colorsys
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from scripts.localize import MaskedClips, collate, load_mask, mask_path
from scripts.synth import make_synthetic, synth_clip

K = 4  # classes


def clip(number, **noise):
    return synth_clip(number, number % K, K, seed=0, frame_size=48, **noise)


def coloured(rgb):
    """(..., 3) uint8 -> (...) bool: strongly coloured pixels (HSV saturation x value > 0.25, pixel by
    pixel with colorsys). Objects have s >= 0.85, v >= 0.8 x 0.45 (dark stripes); the background is
    grey (+-0.04 tint, clutter s <= 0.3 x v <= 0.8 = 0.24), with pixel noise of 0.02."""
    flat = rgb.reshape(-1, 3) / 255.0
    sv = np.array([colorsys.rgb_to_hsv(*p)[1] * colorsys.rgb_to_hsv(*p)[2] for p in flat])
    return sv.reshape(rgb.shape[:-1]) > 0.25


def iou(a, b):  # masks as bool or as 0 / 1 weights
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.mark.parametrize('number', range(6))
def test_mask_is_the_saturated_object(number):
    """The coloured pixels of a frame are the mask, frame by frame; frames without a sounding object
    have an empty mask."""
    waveform, frames, masks, meta = clip(number)
    for i, (frame, mask) in enumerate(zip(frames, masks)):
        assert mask.dtype == bool and mask.shape == frame.shape[:2]
        if not meta['on'][i]:
            assert not mask.any()
            continue
        assert mask.sum() > 20
        assert iou(coloured(frame), mask) > 0.9


def test_offscreen_hides_objects_and_keeps_the_sound():
    base_w, base_f, base_m, base_meta = clip(1)
    w, f, m, meta = clip(1, offscreen=1.0)
    assert np.array_equal(w, base_w)  # the sound is unchanged: its source is only off screen
    assert meta['on'] == base_meta['on'] and not any(meta['visible'])
    assert not any(x.any() for x in m)  # no sounding object on screen, no mask
    for i in range(16):
        if base_meta['on'][i]:
            assert coloured(f[i]).sum() == 0
        else:
            assert np.array_equal(f[i], base_f[i])  # off slots: the same frame
    half = [clip(n, offscreen=0.5)[3] for n in range(K * 5)]
    hidden = sum((np.array(x['on']) > np.array(x['visible'])).any() for x in half)
    assert 0 < hidden < len(half)


def test_silent_object_is_visible_but_not_masked():
    found = 0
    for number in range(8):
        base_w, base_f, base_m, _ = clip(number)
        w, f, m, meta = clip(number, silent_objects=1.0)
        assert np.array_equal(w, base_w)  # it makes no sound
        assert all(np.array_equal(a, b) for a, b in zip(m, base_m))  # and is not in the mask
        shown = np.array(meta['silent_object'], dtype=bool)
        assert 4 <= shown.sum() <= 10
        for i in np.flatnonzero(shown):
            extra = coloured(f[i]) & ~m[i]  # coloured pixels outside the sounding object
            found += extra.sum() > 20
        for i in np.flatnonzero(~shown):
            assert np.array_equal(f[i], base_f[i])
    assert found > 0


def test_clutter_and_hum_touch_one_modality_each():
    base_w, base_f, base_m, _ = clip(2)
    w, f, m, _ = clip(2, clutter=5)
    assert np.array_equal(w, base_w) and all(np.array_equal(a, b) for a, b in zip(m, base_m))
    changed = np.mean([np.abs(a.astype(int) - b).max(axis=-1) > 30 for a, b in zip(f, base_f)])
    assert changed > 0.02
    w, f, m, meta = clip(2, hum=0.05)
    assert all(np.array_equal(a, b) for a, b in zip(f, base_f))
    # the added signal is a steady tone at the hum pitch: the difference's spectrum peaks there
    diff = w.astype(np.float64) - base_w
    spectrum = np.abs(np.fft.rfft(diff))
    peak_hz = np.argmax(spectrum) * data.SAMPLE_RATE / len(diff)
    assert abs(peak_hz - meta['hum_pitch']) < 1.0
    assert 0.02 < np.abs(diff).max() <= 0.1


def test_on_slots_sets_the_amount_of_silence():
    short = [sum(clip(n, on_slots=(2, 3))[3]['on']) for n in range(12)]
    default = [sum(clip(n)[3]['on']) for n in range(12)]
    assert all(2 <= s <= 3 + 3 for s in short) and all(5 <= s <= 13 for s in default)
    assert np.mean(short) < np.mean(default) - 2


def test_make_synthetic_writes_masks_and_dataset_reads_them(tmp_path):
    out = str(tmp_path / 'syn')
    make_synthetic(out, num_clips=10, seed=0, num_classes=2, frame_size=48, offscreen=0.5, clutter=2)
    config = json.load(open(os.path.join(out, 'synth_config.json')))
    assert config['offscreen'] == 0.5 and config['clutter'] == 2 and config['on_slots'] == [5, 10]
    meta = json.load(open(os.path.join(out, 'synth_meta.json')))
    eval_json = os.path.join(out, 'eval.json')
    plain = data.AVDataset(eval_json, mode='eval', audio_length=64, img_size=32)
    assert set(plain[0]) == {'audio', 'image', 'label', 'id'}  # no mask keys unless asked
    ds = MaskedClips(data.AVDataset(eval_json, mode='eval', audio_length=64, img_size=32))
    for k in range(len(ds)):
        item = ds[k]
        assert item['mask'].shape == (16, 32, 32) and item['mask'].dtype == torch.float32 and item['has_mask'].all()
        assert set(item['mask'].unique().tolist()) <= {0.0, 1.0}  # synthetic masks are 0 / 255: weights 0 / 1
        for i in range(16):
            file_mask = np.asarray(Image.open(mask_path(out, i, item['id'])))
            assert file_mask.dtype == np.uint8 and set(np.unique(file_mask)) <= {0, 255}
            assert item['mask'][i].any() == bool(meta[item['id']]['visible'][i])
            if item['mask'][i].any():  # the resized mask sits on the resized frame's object
                rgb = (item['image'][i].permute(1, 2, 0) * torch.tensor(data.IMAGE_STD) +
                       torch.tensor(data.IMAGE_MEAN)).clamp(0, 1).mul(255).round().byte().numpy()
                assert iou(coloured(rgb), item['mask'][i].numpy()) > 0.7
    batch = collate([ds[0], ds[1]])
    assert batch['mask'].shape == (2, 16, 32, 32) and batch['has_mask'].shape == (2, 16)
    os.remove(mask_path(out, 3, ds[0]['id']))  # a frame nobody annotated
    item = ds[0]
    assert not item['has_mask'][3] and not item['mask'][3].any() and item['has_mask'].sum() == 15
    with pytest.raises(ValueError, match='eval-mode'):
        MaskedClips(data.AVDataset(os.path.join(out, 'train.json'), mode='train', audio_length=64, img_size=32))


def test_bad_options_are_errors(tmp_path):
    with pytest.raises(ValueError, match='unknown synthetic-data options'):
        make_synthetic(str(tmp_path), num_clips=1, offscren=0.5)
    with pytest.raises(ValueError, match='on_slots'):
        make_synthetic(str(tmp_path), num_clips=1, on_slots=(0, 3))


@pytest.mark.parametrize('size', [(60, 40), (40, 70)])
def test_load_mask_has_the_geometry_of_load_frame(tmp_path, size):
    """A user's non-square frame and its mask: after loading, the mask covers the frame's red box."""
    w, h = size
    rgb = np.full((h, w, 3), 90, dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    rgb[h // 3:h // 3 + 9, w // 2 - 3:w // 2 + 10] = (220, 20, 20)
    mask[h // 3:h // 3 + 9, w // 2 - 3:w // 2 + 10] = 255  # weight 1 (grey level / 255)
    Image.fromarray(rgb).save(tmp_path / 'f.png')
    Image.fromarray(mask).save(tmp_path / 'm.png')
    image = data.load_frame(str(tmp_path / 'f.png'), 24)
    loaded = load_mask(str(tmp_path / 'm.png'), 24)
    red = image[0] * data.IMAGE_STD[0] + data.IMAGE_MEAN[0] > 0.6  # (24, 24)
    assert loaded.shape == (24, 24) and loaded.any()
    assert iou(red.numpy(), loaded.numpy()) > 0.6
