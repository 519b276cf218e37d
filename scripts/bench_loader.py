"""
Data-loader throughput: training items/s (total and per loader worker) through a DataLoader, from
files (a dataset JSON, clips in random order, AVDataset) or from shards (data.ShardStream).

    python scripts/bench_loader.py --data data_synth/train.json --workers 2
    python scripts/bench_loader.py --data data/audioset/as2m_shards --workers 8 --cold

--cold evicts the dataset's files from the page cache first (posix_fadvise DONTNEED: no root
needed, other files stay cached), so the reads come from the disk. The first batch (worker start)
is not timed.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import time

import torch

from data import (AVDataset, ShardStream, collate, frame_path, is_shard_set, read_clip_table,
                  shard_tables)


def dataset_files(spec):
    """Every file a dataset reads: its wavs and frames, or its shards."""
    if is_shard_set(spec):
        return [path for path, _ in shard_tables(spec)]
    return [f for c in read_clip_table(spec)
            for f in [c['wav']] + [frame_path(c['video_path'], i, c['id']) for i in range(16)]
            if os.path.isfile(f)]


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
        evicted = evict_from_page_cache(files) / 2 ** 20
        print(f"evicted {len(files)} files ({evicted:.0f} MiB) from the page cache")
    if is_shard_set(data_json):
        stream = ShardStream(data_json, batch_size, num_workers=workers,
                             shuffle_buffer=shuffle_buffer, audio_length=audio_length,
                             num_mel_bins=num_mel_bins, img_size=img_size, time_shift=True)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        source = f'shards, shuffle buffer {shuffle_buffer}'
    else:
        dataset = AVDataset(data_json, mode='train', audio_length=audio_length,
                            num_mel_bins=num_mel_bins, img_size=img_size, time_shift=True)
        num_samples = min(len(dataset), batch_size * (num_batches + 1))
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=num_samples)
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
          f"({source}, {workers} workers, img_size {img_size}, audio_length {audio_length}, "
          f"{n} items{', cold page cache' if cold else ''})")
    del batches
    return per_second


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='dataset JSON or shard set')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--img_size', type=int, default=224)
    parser.add_argument('--audio_length', type=int, default=416)
    parser.add_argument('--num_mel_bins', type=int, default=128)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--num_batches', type=int, default=10)
    parser.add_argument('--cold', action='store_true',
                        help="evict the dataset's files from the page cache first")
    parser.add_argument('--shuffle_buffer', type=int, default=100,
                        help='shards: ShardStream buffer')
    args = parser.parse_args()
    bench(args.data, args.workers, args.img_size, args.audio_length, args.num_mel_bins,
          args.batch_size, args.num_batches, args.cold, args.shuffle_buffer)


if __name__ == '__main__':
    main()
