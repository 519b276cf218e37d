"""Shards (`scripts/shard.py`, the TG-DP supplement's webdataset packing): the tar layout read back with
tarfile (and webdataset when installed), items equal to the JSON loader's, resumable packing, and the
training stream's guarantees (disjoint readers, equal batch counts, exact mid-epoch resume, seeding)."""
import io
import json
import os
import tarfile
import types

import numpy as np
import pytest
import soundfile as sf
import torch

import data
from scripts.bench_loader import bench
from scripts.shard import write_shards
from scripts.synth import make_synthetic

SMALL = dict(audio_length=128, img_size=32, time_shift=True)


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    """30 synthetic clips (32 px frames) and their shards, 4 clips per shard."""
    root = tmp_path_factory.mktemp('shards')
    make_synthetic(str(root / 'syn'), num_clips=30, frame_size=32)
    json_path, labels = str(root / 'syn' / 'train.json'), str(root / 'syn' / 'labels.csv')
    write_shards(json_path, str(root / 'sh'), shard_size=4)
    return dict(root=root, json=json_path, labels=labels, shards=str(root / 'sh'))


def read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


def test_tar_layout_and_index(synth):
    entries = json.load(open(synth['json']))['data']
    root = os.path.dirname(synth['json'])
    index = json.load(open(os.path.join(synth['shards'], 'index.json')))
    assert [s['name'] for s in index['shards']] == [f'shards-{k:05d}.tar' for k in range(8)]
    assert [len(s['clips']) for s in index['shards']] == [4] * 7 + [2] and index['skipped'] == {}
    seen = []
    for shard in index['shards']:
        path = os.path.join(synth['shards'], shard['name'])
        with tarfile.open(path) as tar:  # Python's own reader, independent of data.py's header parsing
            members = tar.getmembers()
            assert len(members) == 18 * len(shard['clips'])
            for n, (key, clip_id, labels, index_, offset, end) in enumerate(shard['clips']):
                group = members[18 * n:18 * (n + 1)]
                frames = [f'{key}.frame_{i:02d}.jpg' for i in range(16)]
                assert [m.name for m in group] == [f'{key}.json', f'{key}.wav'] + frames
                assert key == f'{index_:09d}' and group[0].offset == offset
                assert (members[18 * (n + 1)].offset if n + 1 < len(shard['clips']) else tar.offset) >= end
                entry = entries[index_]
                meta = json.loads(tar.extractfile(group[0]).read())
                assert meta == dict(id=entry['video_id'], labels=entry['labels'], index=index_)
                assert clip_id == entry['video_id']
                assert labels == entry['labels']
                assert tar.extractfile(group[1]).read() == read_bytes(os.path.join(root, entry['wav']))
                for i in range(16):
                    assert tar.extractfile(group[2 + i]).read() == read_bytes(data.frame_path(root, i, clip_id))
                seen.append(index_)
    assert sorted(seen) == list(range(len(entries))) and seen != sorted(seen)  # all clips, once, shuffled


def test_header_parser_matches_tarfile(synth, tmp_path):
    path = os.path.join(synth['shards'], 'shards-00001.tar')
    with tarfile.open(path) as tar:
        ref = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    assert data.tar_members(path, 0, os.path.getsize(path)) == ref
    raw = bytearray(read_bytes(path))
    raw[ref[1][1] + 100] ^= 1  # inside the second member's data: not a header, no effect
    raw[ref[1][1] - 512 + 10] ^= 1  # the name field of the second member's header
    (tmp_path / 'bad.tar').write_bytes(bytes(raw))
    with pytest.raises(data.ClipError, match=f"bad.tar: no valid tar header at byte {ref[1][1] - 512} \\(bad checksum"):
        data.tar_members(str(tmp_path / 'bad.tar'), 0, len(raw))


def test_webdataset_reads_the_shards(synth):
    wds = pytest.importorskip('webdataset')
    entries = {e['video_id']: e for e in json.load(open(synth['json']))['data']}
    root = os.path.dirname(synth['json'])
    pattern = os.path.join(synth['shards'], 'shards-{00000..00007}.tar')
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert len(samples) == 30
    for sample in samples:
        meta = json.loads(sample['json'])
        assert sample['__key__'] == f"{meta['index']:09d}"
        assert sample['wav'] == read_bytes(os.path.join(root, entries[meta['id']]['wav']))
        assert sample['frame_15.jpg'] == read_bytes(data.frame_path(root, 15, meta['id']))


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_shard_items_equal_json_items(synth, mode):
    ref = data.AVDataset(synth['json'], synth['labels'], mode=mode, **SMALL)
    specs = [synth['shards'], os.path.join(synth['shards'], 'index.json'),
             os.path.join(synth['shards'], 'shards-{00000..00007}.tar')]
    for spec in specs:
        ds = data.AVDataset(spec, synth['labels'], mode=mode, **SMALL)
        assert [c['id'] for c in ds.clips] == [c['id'] for c in ref.clips]  # JSON order
        for epoch in (0, 3):
            ds.set_epoch(epoch), ref.set_epoch(epoch)
            for i in (range(len(ds)) if spec == synth['shards'] else (0, 17, 29)):
                a, b = ref[i], ds[i]
                assert a['id'] == b['id'] and a.get('frame') == b.get('frame')
                for key in ('audio', 'image', 'label'):
                    assert torch.equal(a[key], b[key]), (spec, i, key)
    if mode == 'eval':  # evaluate.py takes a shard folder wherever it takes a JSON
        import evaluate
        config = types.SimpleNamespace(audio_length=128, num_mel_bins=128, img_size=32)
        a = evaluate.make_dataset(synth['json'], synth['labels'], config)
        b = evaluate.make_dataset(synth['shards'], synth['labels'], config)
        assert torch.equal(a[7]['audio'], b[7]['audio']) and torch.equal(a[7]['image'], b[7]['image'])
    # a subset of shards, read through loader workers (each opens its own descriptors)
    ds = data.AVDataset(os.path.join(synth['shards'], 'shards-{00002,00005}.tar'), mode=mode, **SMALL)
    assert len(ds) == 8
    ids = {c['id']: n for n, c in enumerate(ref.clips)}
    ref.set_epoch(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.collate)
    for batch in loader:
        for k, clip_id in enumerate(batch['id']):
            assert torch.equal(batch['audio'][k], ref[ids[clip_id]]['audio'])


def test_bench_reads_shards_cold(synth, capsys):
    for spec, source in [(synth['shards'], 'shards, shuffle buffer 2'), (synth['json'], 'files')]:
        assert bench(spec, img_size=32, audio_length=128, batch_size=2, num_batches=2, cold=True,
                          shuffle_buffer=2) > 0
        out = capsys.readouterr().out
        assert f'({source}, 0 workers' in out and '4 items, cold page cache' in out and 'evicted' in out


def test_flac_shards_equal_and_smaller(synth):
    # synthetic wavs are 16-bit PCM: flac is lossless for them
    out = str(synth['root'] / 'sh_flac')
    write_shards(synth['json'], out, shard_size=8, audio='flac')
    with tarfile.open(os.path.join(out, 'shards-00000.tar')) as tar:
        names = tar.getnames()
        assert names[1].endswith('.flac')
        flac = tar.extractfile(names[1]).read()
    index = json.load(open(os.path.join(out, 'index.json')))
    entry = json.load(open(synth['json']))['data'][index['shards'][0]['clips'][0][3]]
    wav = os.path.join(os.path.dirname(synth['json']), entry['wav'])
    assert np.array_equal(sf.read(io.BytesIO(flac), dtype='int16')[0], sf.read(wav, dtype='int16')[0])
    assert len(flac) < 0.9 * os.path.getsize(wav)
    for mode in ('train', 'eval'):
        ref = data.AVDataset(synth['json'], mode=mode, **SMALL)
        ds = data.AVDataset(out, mode=mode, **SMALL)
        for i in (0, 11, 29):
            assert torch.equal(ref[i]['audio'], ds[i]['audio']) and torch.equal(ref[i]['image'], ds[i]['image'])


def test_shard_writing_resumes_and_lists_bad_clips(synth, tmp_path, capsys):
    out = str(tmp_path / 'sh')
    entries = json.load(open(synth['json']))['data']
    # a copy of the JSON whose clip 5 lost a frame
    json_path = str(tmp_path / 'train.json')
    root = os.path.dirname(synth['json'])
    bad = entries[5]['video_id']
    for e in entries:
        e['wav'], e['video_path'] = os.path.join(root, e['wav']), root if e['video_id'] != bad else str(tmp_path)
    json.dump({'data': entries}, open(json_path, 'w'))
    first = write_shards(json_path, out, shard_size=7)
    assert list(first['skipped']) == [bad] and 'frame file not found' in first['skipped'][bad]
    assert sum(len(s['clips']) for s in first['shards']) == 29
    # an interrupted run: a shard missing, a half-written .tmp; the rerun writes only that shard
    os.remove(os.path.join(out, 'shards-00002.tar'))
    with open(os.path.join(out, 'shards-00002.tar.tmp'), 'wb') as f:
        f.write(b'half a shard')
    stamps = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.endswith('.tar')}
    capsys.readouterr()
    again = write_shards(json_path, out, shard_size=7)
    assert '5 shards: 4 already written, 1 to write' in capsys.readouterr().out
    assert again == first
    assert all(os.path.getmtime(os.path.join(out, n)) == t for n, t in stamps.items())
    assert not os.path.exists(os.path.join(out, 'shards-00002.tar.tmp'))
    with pytest.raises(ValueError, match='shard_size differ'):
        write_shards(json_path, out, shard_size=5)
    ds = data.AVDataset(out, mode='eval', **SMALL)
    assert len(ds) == 29 and bad not in [c['id'] for c in ds.clips]


# -----------------------------------------------------------------------------
# the training stream

def stream(synth, **kwargs):
    return data.ShardStream(synth['shards'], **{'batch_size': 3, 'label_csv': synth['labels'], 'seed': 5,
                                                 'shuffle_buffer': 5, **SMALL, **kwargs})


def take(s, n):
    """The first n batches through a DataLoader with s.num_workers workers."""
    loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=s.num_workers)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            return batches


def test_stream_ranks_and_workers_disjoint_equal_counts(synth):
    ref = data.AVDataset(synth['json'], synth['labels'], mode='train', seed=5, **SMALL)
    number = {c['id']: n for n, c in enumerate(ref.clips)}
    ranks = [stream(synth, rank=r, world_size=2, num_workers=2) for r in (0, 1)]
    counts = [[s.batches_per_epoch(e) for e in range(2)] for s in ranks]
    assert counts[0] == counts[1] and min(counts[0]) > 0
    # per reader: whole shards, disjoint; the fewest clips any reader holds decide the count
    n0, n1 = counts[0]
    seen = {}
    for r, s in enumerate(ranks):
        batches = take(s, n0 + n1)
        assert [b['epoch'] for b in batches] == [0] * n0 + [1] * n1
        assert [b['batch'] for b in batches] == list(range(n0)) + list(range(n1))
        for b in batches:
            worker = b['batch'] % 2
            seen.setdefault((b['epoch'], r, worker), []).extend(b['id'])
            ref.set_epoch(b['epoch'])
            for k, clip_id in enumerate(b['id']):  # the JSON loader's item for the same clip and epoch
                item = ref[number[clip_id]]
                assert item['frame'] == b['frame'][k]
                assert torch.equal(item['audio'], b['audio'][k]) and torch.equal(item['image'], b['image'][k])
                assert torch.equal(item['label'], b['label'][k])
    for epoch in range(2):
        readers = [set(seen[epoch, r, w]) for r in range(2) for w in range(2)]
        assert sum(map(len, readers)) == len(set().union(*readers))  # disjoint
        assert all(len(seen[epoch, r, w]) == len(readers[0]) for r in range(2) for w in range(2))
        # each reader's clips come from its own shards: shard sets of the readers are disjoint
        index = json.load(open(os.path.join(synth['shards'], 'index.json')))
        shard_of = {row[1]: s['name'] for s in index['shards'] for row in s['clips']}
        shard_sets = [{shard_of[i] for i in reader} for reader in readers]
        assert sum(map(len, shard_sets)) == len(set().union(*shard_sets))
    # the count is the most every reader can fill (an independent check over several epochs, batch 4:
    # readers hold 6 or 8 clips, so a count taken from any one reader would be wrong somewhere)
    for epoch in range(6):
        big = [stream(synth, rank=r, world_size=2, num_workers=2, batch_size=4) for r in (0, 1)]
        n = big[0].batches_per_epoch(epoch) // 2
        assert big[1].batches_per_epoch(epoch) // 2 == n
        held = [sum(s.shards[k][1] for k in s.reader_shards(epoch, c)) for s in big[:1] for c in range(4)]
        assert min(held) >= 4 * n and min(held) < 4 * (n + 1)
    # too many readers for the shards: a clear error
    with pytest.raises(ValueError, match='8 shards for 3 ranks x 3 loader workers'):
        stream(synth, world_size=3, num_workers=3)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_stream_resume_mid_epoch_is_exact(synth, num_workers):
    full = take(stream(synth, num_workers=num_workers), 16)
    n0 = stream(synth, num_workers=num_workers).batches_per_epoch(0)
    assert n0 < 16  # the run crosses into epoch 1
    for epoch, k in [(0, 1), (0, 4), (0, n0 - 1), (1, 1)]:
        at = k if epoch == 0 else n0 + k
        resumed = take(stream(synth, num_workers=num_workers, start=(epoch, k)), 16 - at)
        for a, b in zip(full[at:], resumed):
            assert a['id'] == b['id'] and (a['epoch'], a['batch']) == (b['epoch'], b['batch'])
            assert torch.equal(a['audio'], b['audio']) and torch.equal(a['image'], b['image'])


def test_stream_skips_without_decoding(synth, monkeypatch):
    s = stream(synth, start=(0, 6))
    calls = []
    real = data.load_item
    monkeypatch.setattr(data, 'load_item', lambda *a, **k: calls.append(1) or real(*a, **k))
    next(iter(s))
    assert len(calls) == 3  # one batch decoded, the 6 before it only formed from headers


def test_stream_seeded_shuffle_and_adaptive_batch(synth, monkeypatch):
    order = lambda s, n: [i for b in take(s, n) for i in b['id']]
    n0 = stream(synth).batches_per_epoch(0)
    a = order(stream(synth), n0)
    assert a == order(stream(synth), n0)  # same seed, same order
    assert a != order(stream(synth, seed=6), n0)
    assert a != order(stream(synth, start=(1, 0)), n0)  # a new order each epoch
    # without a buffer the clips come in shard order: the buffer does shuffle within shards
    assert a != order(stream(synth, shuffle_buffer=1), n0)
    # the buffer's own seed: with the shards fixed, the order still follows seed and epoch
    monkeypatch.setattr(data.ShardStream, 'reader_shards', lambda self, epoch, reader: [0, 1, 2])
    fixed = lambda seed, epoch: order(stream(synth, seed=seed, start=(epoch, 0)), 4)
    assert fixed(5, 0) == fixed(5, 0) and fixed(5, 0) != fixed(6, 0) and fixed(5, 0) != fixed(5, 1)
    assert sorted(fixed(5, 0)) == sorted(fixed(6, 0))  # same clips, other order
    monkeypatch.undo()
    s = stream(synth, batch_size=[4, 2])
    counts = [s.batches_per_epoch(e) for e in range(3)]
    assert counts == [30 // 4, 30 // 2, 30 // 2]  # the last entry holds on
    batches = take(s, counts[0] + 2)
    assert [len(b['id']) for b in batches] == [4] * counts[0] + [2, 2]
    s = stream(synth, batch_size=lambda e: 5 + e)
    assert [s.batches_per_epoch(e) for e in range(2)] == [30 // 5, 30 // 6]


def test_stream_resume_layout_and_worker_checks(synth):
    layout = stream(synth, world_size=2, num_workers=1).layout()
    stream(synth, world_size=2, num_workers=1, resume_layout=layout)  # unchanged: fine
    with pytest.raises(ValueError, match='world_size, num_workers changed'):
        stream(synth, world_size=1, num_workers=2, resume_layout=layout)
    with pytest.raises(ValueError, match='outside epoch 0'):
        stream(synth, start=(0, 99))
    with pytest.raises(ValueError, match='built for num_workers=2 but runs with 0'):
        next(iter(stream(synth, num_workers=2)))


def test_feature_cache_keys_shard_sets(synth, tmp_path, monkeypatch):
    """evaluate.py --cache on a brace pattern: a plain file name, a hit on the second call, a miss
    after a shard changes (the key stamps every shard, not the pattern string)."""
    import evaluate
    import model
    calls = []
    monkeypatch.setattr(evaluate, 'load_model', lambda *a: types.SimpleNamespace(config=model.ModelConfig()))
    monkeypatch.setattr(evaluate, 'extract_features', lambda m, ds, *a: calls.append(len(ds)) or
                        dict(g_a=torch.zeros(len(ds), 16, 4), g_v=torch.zeros(len(ds), 16, 4)))
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(b'weights')
    cache = str(tmp_path / 'cache')
    spec = os.path.join(synth['shards'], 'shards-{00000..00003}.tar')
    evaluate.features_for(str(ckpt), spec, cache=cache)
    assert os.listdir(cache)[0].startswith('shards-_00000..00003_-')
    evaluate.features_for(str(ckpt), spec, cache=cache)
    assert calls == [16]  # cached
    shard = os.path.join(synth['shards'], 'shards-00002.tar')
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    evaluate.features_for(str(ckpt), spec, cache=cache)
    assert calls == [16, 16] and len(os.listdir(cache)) == 2
