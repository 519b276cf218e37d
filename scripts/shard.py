r"""
Packs the clips of a dataset JSON into tar shards (webdataset convention), the form the TG-DP
authors trained from: loading millions of small files was their bottleneck (TG-DP supp. sec. 1.2);
a prepared clip is 17 files (1 wav + 16 JPEGs), about 22 M files for AudioSet-2M.

    python scripts/shard.py --data data/audioset/as2m_train.json --out data/audioset/as2m_shards \
        --workers 4 [--shard_size 1000] [--audio wav|flac] [--seed 0]

Writes OUT/shards-00000.tar, ... and OUT/index.json:
- webdataset convention, readable with `tarfile` and by `webdataset` as is: per clip the members
  KEY.json ({"id", "labels", "index"}), KEY.wav (or KEY.flac: lossless for 16/24-bit PCM, about
  half the bytes), KEY.frame_00.jpg ... KEY.frame_15.jpg, the prepared files' bytes unchanged.
  KEY is the clip's position in the JSON (9 digits: AudioSet ids hold dots, which webdataset reads
  as extensions). Clips are spread over the shards in a random order (--seed), so every shard
  mixes classes. Tar metadata is fixed: the same clips give the same bytes every run.
- index.json: the settings, and per shard the clips' key, id, labels, JSON position and byte
  range; clips left out (a missing or unreadable file) under 'skipped' with the reason.
- Resumable: a shard is written to .tmp and renamed, so one that exists is complete; a rerun
  writes the rest (and refuses a folder written with other settings).
There must be at least (ranks x loader workers) shards for training: pick --shard_size
accordingly (AudioSet-2M at 1000: about 2000 shards, ~0.5 GB each).

Reading: data.AVDataset takes a shard folder, its index.json, a brace pattern
'DIR/shards-{00000..00123}.tar' or one .tar wherever it takes a JSON, and train.py trains from a
shard set (train_json) through data.ShardStream.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data import SHARD_FORMAT, ClipError, check_clip, clip_frame, read_clip_table, scan_shard

SHARD_NAME = 'shards-{:05d}.tar'


def table_row(clip):  # one clip of a shard in index.json
    return [clip['key'], clip['id'], clip['labels'], clip['index'], clip['offset'], clip['end']]


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
            raise ClipError(f"{clip['wav']}: flac keeps 16/24-bit PCM only, this wav is "
                            f"{info.subtype} (use --audio wav)")
        samples, rate = sf.read(clip['wav'], dtype='int32', always_2d=True)
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format='FLAC', subtype=info.subtype)
        sound = buffer.getvalue()
    meta = dict(id=clip['id'], labels=clip['labels'], index=clip['index'])
    members = [('json', json.dumps(meta).encode()), (audio, sound)]
    for i in range(num_frames):
        with open(clip_frame(clip, i), 'rb') as f:
            members.append((f'frame_{i:02d}.jpg', f.read()))
    return members


def pack_shard(path, clips, audio, num_frames, progress):
    """Writes one shard (tmp file + rename: a shard that exists is complete) -> (rows,
    {id: why skipped})."""
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
                # fixed metadata: the same bytes every run
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
            rows.append([key, clip['id'], clip['labels'], clip['index'], offset, tar.offset])
            progress.update()
    os.replace(path + '.tmp', path)
    return rows, skipped


def check_settings(out, settings):
    """A folder with an index.json of an earlier run must have been written with these settings."""
    index_path = os.path.join(out, 'index.json')
    if not os.path.isfile(index_path):
        return
    with open(index_path) as f:
        old = json.load(f)
    changed = [k for k in settings if k not in ('complete', 'source') and old.get(k) != settings[k]]
    if changed:
        raise ValueError(f"{out} holds shards written with other settings ({', '.join(changed)} "
                         f"differ): use another --out or delete the folder")


def write_shards(data_json, out, shard_size=1000, audio='wav', seed=0, num_frames=16, workers=1):
    """Packs the clips of a dataset JSON into OUT/shards-00000.tar, ... (shard_size clips each, in
    a permutation of the JSON order from seed, so every shard mixes classes) and OUT/index.json (per
    shard: its clips' key, id, labels, JSON index and byte range). Resumable: finished shards are
    kept (their index rows read back from their headers). Clips with a missing or unreadable file
    are left out and listed in index.json ('skipped', with the reason). Returns the index."""
    if audio not in ('wav', 'flac'):
        raise ValueError(f"audio must be 'wav' or 'flac', got {audio!r}")
    clips = read_clip_table(data_json)
    if not clips or 'tar' in clips[0]:
        raise ValueError(f"{data_json}: expected a dataset JSON with clips "
                         f"(shards are packed from files)")
    order = np.random.default_rng(seed).permutation(len(clips))
    groups = [[clips[i] for i in order[k:k + shard_size]] for k in range(0, len(clips), shard_size)]
    ids_sha1 = hashlib.sha1('\n'.join(c['id'] for c in clips).encode()).hexdigest()
    settings = dict(format=SHARD_FORMAT, complete=False, num_clips=len(clips),
                    shard_size=shard_size, seed=seed, audio=audio, num_frames=num_frames,
                    source=os.path.relpath(os.path.abspath(data_json), out), ids_sha1=ids_sha1)
    os.makedirs(out, exist_ok=True)
    check_settings(out, settings)
    index_path = os.path.join(out, 'index.json')
    with open(index_path, 'w') as f:
        json.dump(settings, f)  # incomplete until the end
    paths = [os.path.join(out, SHARD_NAME.format(k)) for k in range(len(groups))]
    todo = [k for k in range(len(groups)) if not os.path.isfile(paths[k])]
    print(f"{len(clips)} clips -> {len(groups)} shards: {len(groups) - len(todo)} already written, "
          f"{len(todo)} to write")
    results = {}
    with tqdm(total=sum(len(groups[k]) for k in todo), desc='shard', unit='clip') as progress:
        def pack(k):
            return pack_shard(paths[k], groups[k], audio, num_frames, progress)
        with ThreadPoolExecutor(workers) as pool:  # file reads and writes: threads overlap waits
            for k, result in zip(todo, pool.map(pack, todo)):
                results[k] = result
    shards, skipped = [], {}
    for k in tqdm(range(len(groups)), desc='index', leave=False):
        if k in results:
            rows, bad = results[k]
        else:  # written by an earlier run: rows from its headers, skipped clips checked again
            rows = [table_row(c) for c in scan_shard(paths[k])]
            packed = {r[1] for r in rows}
            bad = {c['id']: check_clip(c, num_frames) or 'left out by an earlier run'
                   for c in groups[k] if c['id'] not in packed}
        shards.append(dict(name=os.path.basename(paths[k]), bytes=os.path.getsize(paths[k]),
                           clips=rows))
        skipped.update(bad)
    index = dict(settings, complete=True, shards=shards, skipped=skipped)
    with open(index_path + '.tmp', 'w') as f:
        json.dump(index, f)
    os.replace(index_path + '.tmp', index_path)
    packed = sum(len(s['clips']) for s in shards)
    listed = f"{', '.join(list(skipped)[:5])}{', ...' if len(skipped) > 5 else ''}"
    print(f"wrote {index_path}: {packed} clips in {len(shards)} shards, {len(skipped)} left out"
          + (f" ({listed}: reasons in index.json 'skipped')" if skipped else ''))
    return index


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='dataset JSON')
    parser.add_argument('--out', required=True,
                        help='folder for shards-00000.tar, ... and index.json')
    parser.add_argument('--shard_size', type=int, default=1000,
                        help='clips per shard (~0.5 GB at 1000 prepared clips)')
    parser.add_argument('--audio', choices=('wav', 'flac'), default='wav',
                        help='flac: lossless, about half the bytes')
    parser.add_argument('--seed', type=int, default=0,
                        help='permutation of the clips over the shards')
    parser.add_argument('--num_frames', type=int, default=16)
    parser.add_argument('--workers', type=int, default=1, help='shards written at a time')
    args = parser.parse_args()
    write_shards(args.data, args.out, args.shard_size, args.audio, args.seed, args.num_frames,
                 args.workers)


if __name__ == '__main__':
    main()
