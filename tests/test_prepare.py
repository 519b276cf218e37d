"""scripts/prepare.py: real clips from ../shared through ffmpeg into the CAV-MAE layout, failures
recorded (not fatal, not retried unless asked), the exit status, and bad input."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import soundfile as sf
import torch
from PIL import Image

import data
import scripts.prepare
from scripts.prepare import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ffmpeg = pytest.mark.skipif(shutil.which('ffmpeg') is None, reason='ffmpeg is not installed')


def run_prepare(videos, out, *extra, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'prepare.py'),
                           '--videos', videos, '--out', out, *extra],
                          capture_output=True, text=True, env=env)


@needs_ffmpeg
def test_prepare_real_clips_then_dataset(shared_dir, tmp_path):
    videos = os.path.join(shared_dir, 'data', 'sample_videos')
    out = str(tmp_path / 'prepared')
    result = run_prepare(videos, out)
    assert result.returncode == 0, result.stdout + result.stderr
    entries = json.load(open(os.path.join(out, 'data.json')))['data']
    ids = sorted(e['video_id'] for e in entries)
    assert ids == sorted(os.path.splitext(n)[0] for n in os.listdir(videos))
    for clip_id in ids:
        info = sf.info(os.path.join(out, 'audio', f'{clip_id}.wav'))
        assert info.samplerate == 16000 and info.channels == 1 and info.duration > 9.9
        sizes = {Image.open(data.frame_path(out, i, clip_id)).size for i in range(16)}
        assert len(sizes) == 1 and min(sizes.pop()) <= 224
    train = data.AVDataset(os.path.join(out, 'data.json'), audio_length=416, img_size=224)
    evaluation = data.AVDataset(os.path.join(out, 'data.json'), mode='eval', audio_length=416, img_size=224)
    for i in range(2):
        t, e = train[i], evaluation[i]
        assert t['audio'].shape == (416, 128) and t['image'].shape == (3, 224, 224)
        assert e['audio'].shape == (16, 416, 128) and e['image'].shape == (16, 3, 224, 224)
        assert torch.isfinite(e['audio']).all() and e['audio'].std() > 0.1 and e['image'].std() > 0.1
        assert not torch.equal(e['image'][0], e['image'][15])  # frames come from different moments
    # resumable: a second run prepares nothing and leaves the files alone
    stamp = os.path.getmtime(data.frame_path(out, 0, ids[0]))
    result = run_prepare(videos, out)
    assert result.returncode == 0 and '2 already done, 0 to prepare' in result.stdout
    assert os.path.getmtime(data.frame_path(out, 0, ids[0])) == stamp


@needs_ffmpeg
def test_prepare_failure_is_listed_not_fatal(shared_dir, tmp_path):
    good = os.path.join(shared_dir, 'data', 'sample_videos', '00W1lcxW-WU_40.000.mp4')
    bad = tmp_path / 'broken.mp4'
    bad.write_bytes(b'this is not a video')
    listing = tmp_path / 'videos.txt'
    listing.write_text(f'{bad}\n{good}\n')
    out = str(tmp_path / 'prepared')
    result = run_prepare(str(listing), out)
    assert result.returncode == 0, result.stdout + result.stderr  # prepared what it could
    assert '1 videos failed' in result.stdout and f'{bad}: ' in result.stdout
    assert 'Invalid data' in result.stdout  # ffmpeg's own message
    assert '1 prepared now, 0 without an audio track, 1 failed' in result.stdout
    entries = json.load(open(os.path.join(out, 'data.json')))['data']
    assert [e['video_id'] for e in entries] == ['00W1lcxW-WU_40.000']
    assert not os.path.exists(os.path.join(out, 'audio', 'broken.wav'))
    failed = json.load(open(os.path.join(out, 'failed.json')))
    assert list(failed) == ['broken'] and failed['broken']['error'] == 'ffmpeg'
    # the next run leaves the recorded failure alone, and still succeeds
    result = run_prepare(str(listing), out)
    assert result.returncode == 0 and '1 already done, 0 to prepare, 1 recorded as failed' in result.stdout
    assert json.load(open(os.path.join(out, 'failed.json'))) == failed
    result = run_prepare(str(listing), out, '--retry_failed')
    assert result.returncode == 0 and '1 already done, 1 to prepare' in result.stdout
    assert f'{bad}: ' in result.stdout


def test_prepare_duplicate_check_is_linear(tmp_path, monkeypatch):
    # 2 M videos: the check must not be quadratic (ids.count in a loop took ~15 s here for 30 k ids)
    monkeypatch.setattr(scripts.prepare.shutil, 'which', lambda name: '/usr/bin/true')
    listing = tmp_path / 'videos.txt'
    names = [f'/videos/{k:07d}_{k % 997:06d}.mp4' for k in range(30000)]
    listing.write_text('\n'.join(names + ['/elsewhere/0000005_000005.mp4', names[7]]) + '\n')
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"share the clip id\(s\) \['0000005_000005', '0000007_000007'\]"):
        prepare(str(listing), str(tmp_path / 'out'))
    assert time.perf_counter() - t0 < 1.0


def test_prepare_without_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))  # a PATH with no ffmpeg on it
    with pytest.raises(RuntimeError, match='ffmpeg not found'):
        prepare(str(tmp_path), str(tmp_path / 'out'))




FAKE_FFMPEG = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.log"
case "$*" in
  *silent*) echo "Stream map '0:a:0' matches no streams." >&2 ;;
  *) echo "broken.mp4: Invalid data found when processing input" >&2 ;;
esac
exit 1
"""


@pytest.fixture
def fake_ffmpeg(tmp_path):
    """An ffmpeg on PATH that fails every call (no audio for 'silent' videos) and logs its calls."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'ffmpeg').write_text(FAKE_FFMPEG)
    (bin_dir / 'ffmpeg').chmod(0o755)
    log = bin_dir / 'calls.log'

    def calls():
        return len(log.read_text().splitlines()) if log.exists() else 0
    return dict(env={**os.environ, 'PATH': f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls=calls)


def test_recorded_failures_are_not_retried_unless_asked(tmp_path, fake_ffmpeg, monkeypatch):
    monkeypatch.setenv('PATH', fake_ffmpeg['env']['PATH'])
    videos = tmp_path / 'videos'
    videos.mkdir()
    for name in ('silent_clip.mp4', 'broken.mp4'):
        (videos / name).write_bytes(b'')
    out = str(tmp_path / 'out')
    first = prepare(str(videos), out)
    assert fake_ffmpeg['calls']() == 2  # one (audio) call each, then the failure
    assert {k: first[k] for k in ('videos', 'prepared', 'no_audio', 'failed', 'not_retried', 'clips')} == \
        dict(videos=2, prepared=0, no_audio=1, failed=1, not_retried=0, clips=0)
    failed = json.load(open(os.path.join(out, 'failed.json')))
    assert {i: r['error'] for i, r in failed.items()} == {'silent_clip': 'no_audio', 'broken': 'ffmpeg'}
    again = prepare(str(videos), out)
    assert fake_ffmpeg['calls']() == 2 and again['not_retried'] == 2 and again['failures'] == {}
    assert json.load(open(os.path.join(out, 'failed.json'))) == failed  # the records stay
    retried = prepare(str(videos), out, retry_failed=True)
    assert fake_ffmpeg['calls']() == 4 and retried['not_retried'] == 0 and len(retried['failures']) == 2


def test_exit_status(tmp_path, fake_ffmpeg):
    videos = tmp_path / 'videos'
    videos.mkdir()
    (videos / 'broken.mp4').write_bytes(b'')
    out = str(tmp_path / 'out')
    result = run_prepare(str(videos), out, env=fake_ffmpeg['env'])  # every video failed: nothing to use
    assert result.returncode == 1 and 'no clip could be prepared' in result.stderr
    assert '0 prepared now, 0 without an audio track, 1 failed' in result.stdout
    empty = tmp_path / 'empty'
    empty.mkdir()
    result = run_prepare(str(empty), out, env=fake_ffmpeg['env'])  # usage errors: nothing started
    assert result.returncode == 2 and 'no videos' in result.stderr
    result = run_prepare(str(tmp_path / 'no_such_list.txt'), out, env=fake_ffmpeg['env'])
    assert result.returncode == 2 and 'no_such_list.txt' in result.stderr
    no_ffmpeg = {**os.environ, 'PATH': str(empty)}
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'prepare.py'), '--videos',
                             str(videos), '--out', out], capture_output=True, text=True, env=no_ffmpeg)
    assert result.returncode == 2 and 'ffmpeg not found' in result.stderr
    help_text = run_prepare('-', out, '--help').stdout
    assert 'Exit status:' in help_text and '--retry_failed' in help_text
