"""
Raw videos -> the CAV-MAE layout, with ffmpeg: 16 kHz mono wavs and 16 frames over the first 10 s.

    python scripts/prepare.py --videos /data/audioset/videos --out data/audioset --workers 16
    python scripts/prepare.py --videos videos.txt --out data/vggsound --retry_failed

--videos is a folder (its files with a video extension) or a text file of paths, one a line ('#'
starts a comment). The clip id is the file stem, so name the files as the usual downloaders do
(AudioSet `--PJHxphWEs_30.000.mp4`, VGGSound `---g-f_I2yQ_000001.mp4`; see scripts/splits.py
--help); two videos with the same stem are an error. The videos must be the 10-s clips themselves
(as the downloaders cut them): the first 10 s of each file are read.

Writes OUT/audio/{id}.wav (first channel, 16 kHz, 16-bit), OUT/frame_{i}/{id}.jpg (frame i shown at
about t = i * 10 / num_frames s, the shorter side scaled down to --short_side, bicubic) and
OUT/data.json (every prepared clip, labels empty: enough for pretraining; scripts/splits.py writes
labelled splits). Files appear atomically (tmp + rename), and clips already prepared are skipped,
so an interrupted run is resumed by running it again.

Videos that could not be prepared are recorded in OUT/failed.json, {clip id: {video, error,
message}}: error 'no_audio' for a video without an audio track (a few percent of AudioSet /
VGGSound downloads), 'ffmpeg' with ffmpeg's message for the others. A later run does not try them
again unless given --retry_failed. The run prints how many videos were prepared earlier, prepared
now, have no audio track, failed, and were left as recorded.

Exit status:
  0  every listed video is prepared or recorded in failed.json (some failures are normal)
  1  nothing could be prepared: no clip in OUT/data.json (e.g. every video failed)
  2  an error stopped the run, before any video in these cases: bad arguments, an unreadable or
     empty video list, clip ids shared by several videos, no ffmpeg on PATH
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import json
import shutil
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from data import SAMPLE_RATE, frame_path

VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.avi', '.mov', '.flv', '.m4v', '.mpg', '.mpeg')


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
        result = subprocess.run([ffmpeg, '-nostdin', '-v', 'error', '-y', *args],
                                capture_output=True, text=True)
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
        run(['-t', '10', '-i', video, '-vf', f'fps={num_frames}/10{scale}',
             '-frames:v', str(num_frames), '-q:v', '2', os.path.join(tmp, '%02d.jpg')])
        got = len([n for n in os.listdir(tmp) if n.endswith('.jpg')])
        if got < num_frames:
            raise RuntimeError(f'only {got} of {num_frames} frames in the first 10 s '
                               f'(video too short?)')
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
        if not os.path.isdir(folder):
            return set()
        return {n[:-len(ext)] for n in os.listdir(folder) if n.endswith(ext)}
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


def record_failures(out, done, failures):
    """Writes OUT/failed.json: earlier runs' records of clips still not prepared, updated with this
    run's failures {video: exception}."""
    record = {i: r for i, r in read_failures(out).items() if i not in done}
    for video, e in failures.items():
        kind = 'no_audio' if isinstance(e, NoAudioTrack) else 'ffmpeg'
        clip_id = os.path.splitext(os.path.basename(video))[0]
        record[clip_id] = dict(video=video, error=kind, message=str(e))
    with open(os.path.join(out, 'failed.json'), 'w') as f:
        json.dump(record, f, indent=1)


def print_failures(out, failures):
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


def prepare(videos, out, num_frames=16, short_side=224, workers=1, retry_failed=False):
    """Raw videos -> CAV-MAE layout in OUT and OUT/data.json (clip id = file stem, labels empty).
    Resumable: clips whose wav and frames exist are skipped, and so are videos recorded in
    OUT/failed.json by an earlier run unless retry_failed. Returns the run's counts: videos,
    done_before, prepared, no_audio, failed, not_retried, clips (in data.json), and failures
    {video: message} of this run."""
    ffmpeg = shutil.which('ffmpeg')
    if ffmpeg is None:
        raise RuntimeError("ffmpeg not found on PATH: `prepare` needs the ffmpeg command-line tool "
                           "(e.g. apt-get install ffmpeg)")
    paths = list_videos(videos)
    if not paths:
        raise ValueError(f"{videos}: no videos (extensions {', '.join(VIDEO_EXTENSIONS)})")
    ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)  # linear: 2 M videos
    if duplicates:
        raise ValueError(f"{videos}: several videos share the clip id(s) {duplicates[:5]} "
                         f"(file stem)")
    os.makedirs(os.path.join(out, 'audio'), exist_ok=True)
    for i in range(num_frames):
        os.makedirs(os.path.join(out, f'frame_{i}'), exist_ok=True)
    done = prepared_ids(out, num_frames)
    recorded = set() if retry_failed else set(read_failures(out)) - done
    todo = [p for p, i in zip(paths, ids) if i not in done and i not in recorded]
    left = sum(i in recorded for i in ids)
    print(f"{len(paths)} videos: {len(paths) - len(todo) - left} already done, {len(todo)} to "
          f"prepare, {left} recorded as failed by an earlier run (not retried: --retry_failed)")
    failures = {}

    def work(video):
        try:
            prepare_video(ffmpeg, video, out, num_frames, short_side)
        except Exception as e:
            failures[video] = e

    with ThreadPoolExecutor(workers) as pool:  # ffmpeg does the work, threads only wait
        list(tqdm(pool.map(work, todo), total=len(todo), desc='prepare'))
    shutil.rmtree(os.path.join(out, '.tmp'), ignore_errors=True)
    now_done = prepared_ids(out, num_frames)
    entries = [dict(video_id=i, wav=f'audio/{i}.wav', video_path='.', labels='')
               for i in ids if i in now_done]
    with open(os.path.join(out, 'data.json'), 'w') as f:
        json.dump({'data': entries}, f, indent=1)
    record_failures(out, now_done, failures)
    print_failures(out, failures)
    no_audio = sum(isinstance(e, NoAudioTrack) for e in failures.values())
    counts = dict(videos=len(paths), done_before=sum(i in done for i in ids),
                  prepared=len(todo) - len(failures), no_audio=no_audio,
                  failed=len(failures) - no_audio, not_retried=left, clips=len(entries))
    print(f"{counts['videos']} videos: {counts['done_before']} prepared earlier, "
          f"{counts['prepared']} prepared now, {no_audio} without an audio track, "
          f"{counts['failed']} failed, {left} left as recorded in failed.json; "
          f"wrote {os.path.join(out, 'data.json')} with {len(entries)} clips")
    return dict(counts, failures={video: str(e) for video, e in failures.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--videos', required=True,
                        help='a directory of videos or a text file of paths')
    parser.add_argument('--out', required=True)
    parser.add_argument('--num_frames', type=int, default=16)
    parser.add_argument('--short_side', type=int, default=224,
                        help='scale frames down to this (0: keep)')
    parser.add_argument('--workers', type=int, default=1, help='ffmpeg processes at a time')
    parser.add_argument('--retry_failed', action='store_true',
                        help='try again the videos an earlier run recorded in failed.json')
    args = parser.parse_args()
    try:
        counts = prepare(args.videos, args.out, args.num_frames, args.short_side, args.workers,
                         args.retry_failed)
    except (OSError, ValueError, RuntimeError) as e:
        parser.exit(2, f"error: {e}\n")
    if counts['clips'] == 0:
        parser.exit(1, f"error: no clip could be prepared in {args.out} (see failed.json)\n")


if __name__ == '__main__':
    main()
