"""Labelled split JSONs from the official AudioSet / VGGSound metadata: CSVs written here in the
published formats (comment lines, quoted label lists, no header for VGGSound, a duplicate row), videos
made with ffmpeg (one without an audio track, one broken, one listed but absent) plus the two real
sample videos, prepared with scripts/prepare.py; scripts/splits.py writes the splits."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import scripts.splits as splits
from scripts.prepare import prepare

needs_ffmpeg = pytest.mark.skipif(shutil.which('ffmpeg') is None, reason='ffmpeg is not installed')

AS_LABELS = 'index,mid,display_name\n0,/m/a,"Speech"\n1,/m/b,"Male speech, man speaking"\n2,/m/c,"Cat"\n3,/m/d,"Dog"\n'
BALANCED = '''# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=5
# YTID, start_seconds, end_seconds, positive_labels
00W1lcxW-WU, 40.000, 50.000, "/m/a,/m/b"
synthAAAAAA, 30.000, 40.000, "/m/b"
missingVID1, 0.000, 10.000, "/m/a"
silentVIDEO, 10.000, 20.000, "/m/c"
'''
UNBALANCED = '''# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=2, num_segs=2, num_unique_labels=2, num_positive_labels=2
# YTID, start_seconds, end_seconds, positive_labels
brokenVIDEO, 0.000, 10.000, "/m/a"
synthAAAAAA, 30.000, 40.000, "/m/d"
'''
EVAL = '''# Segments csv created Sun Mar  5 10:54:31 2017
# YTID, start_seconds, end_seconds, positive_labels
evalVID0001, 5.000, 15.000, "/m/c"
evalVID0001, 5.000, 15.000, "/m/c"
evalVID0002, 0.000, 10.000, "/m/d"
'''
VGG_LABELS = 'index,mid,display_name\n0,vgg_0,dog barking\n1,vgg_1,bird chirping_ tweeting\n2,vgg_2,cat meowing\n'
VGG_CSV = '''KlsG1EnBEjc,361,"bird chirping, tweeting",test
synthVGG001,30,dog barking,train
synthVGG001,30,dog barking,train
missingVGG1,0,dog barking,test
'''


def make_video(path, audio=True, seconds=10.5):
    """A tiny test video (moving test pattern; a 440 Hz tone unless audio=False)."""
    args = ['ffmpeg', '-nostdin', '-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc=size=96x64:rate=10']
    if audio:
        args += ['-f', 'lavfi', '-i', 'sine=frequency=440:sample_rate=22050', '-c:a', 'aac']
    subprocess.run(args + ['-t', str(seconds), '-c:v', 'mpeg4', str(path)], check=True)


@pytest.fixture(scope='module')
def meta(tmp_path_factory, request):
    """Videos -> prepare -> a prepared folder with failed.json, and the metadata files."""
    if shutil.which('ffmpeg') is None:
        pytest.skip('ffmpeg is not installed')
    shared = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared')
    samples = os.path.join(shared, 'data', 'sample_videos')
    if not os.path.isdir(samples):
        pytest.skip(f'{samples} is absent')
    root = tmp_path_factory.mktemp('meta')
    videos = root / 'videos'
    videos.mkdir()
    for name in ('00W1lcxW-WU_40.000.mp4', 'KlsG1EnBEjc_000361.mp4'):  # the downloaders' naming
        os.symlink(os.path.join(samples, name), videos / name)
    for stem in ('synthAAAAAA_30.000', 'synthVGG001_000030', 'evalVID0001_5.000', 'evalVID0002_0.000'):
        make_video(videos / f'{stem}.mp4')
    make_video(videos / 'silentVIDEO_10.000.mp4', audio=False)
    (videos / 'brokenVIDEO_0.000.mp4').write_bytes(b'not a video')
    prepared = str(root / 'prepared')
    failures = prepare(str(videos), prepared, workers=2)['failures']
    assert sorted(os.path.basename(v) for v in failures) == ['brokenVIDEO_0.000.mp4', 'silentVIDEO_10.000.mp4']
    (root / 'prepared' / 'audio' / 'evalVID0002_0.000.wav').write_bytes(b'RIFF garbage')  # unreadable
    files = {}
    for name, text in [('class_labels_indices.csv', AS_LABELS), ('balanced_train_segments.csv', BALANCED),
                       ('unbalanced_train_segments.csv', UNBALANCED), ('eval_segments.csv', EVAL),
                       ('vggsound.csv', VGG_CSV), ('vgg_classes.csv', VGG_LABELS)]:
        (root / name).write_text(text)
        files[name] = str(root / name)
    return dict(root=root, prepared=prepared, **files)


def entries(path):
    return [(e['video_id'], e['labels']) for e in json.load(open(path))['data']]


@needs_ffmpeg
def test_prepare_lists_silent_and_broken_videos(meta):
    failed = json.load(open(os.path.join(meta['prepared'], 'failed.json')))
    assert failed['silentVIDEO_10.000']['error'] == 'no_audio'
    assert 'no audio track' in failed['silentVIDEO_10.000']['message']
    assert failed['brokenVIDEO_0.000']['error'] == 'ffmpeg' and 'Invalid data' in failed['brokenVIDEO_0.000']['message']
    assert not os.path.exists(data.frame_path(meta['prepared'], 0, 'silentVIDEO_10.000'))  # nothing half-done
    ids = {e['video_id'] for e in json.load(open(os.path.join(meta['prepared'], 'data.json')))['data']}
    assert ids == {'00W1lcxW-WU_40.000', 'KlsG1EnBEjc_000361', 'synthAAAAAA_30.000', 'synthVGG001_000030',
                   'evalVID0001_5.000', 'evalVID0002_0.000'}


@needs_ffmpeg
def test_audioset_splits(meta, capsys):
    out = str(meta['root'] / 'splits_as')  # another folder than the prepared one: relative paths
    summaries = splits.build_audioset(meta['prepared'], meta['class_labels_indices.csv'], out,
                                    meta['balanced_train_segments.csv'], meta['unbalanced_train_segments.csv'],
                                    meta['eval_segments.csv'], workers=2)
    printed = capsys.readouterr().out
    # expected by hand from the CSVs above
    assert entries(os.path.join(out, 'as20k_train.json')) == [('00W1lcxW-WU_40.000', '/m/a,/m/b'),
                                                              ('synthAAAAAA_30.000', '/m/b')]
    assert entries(os.path.join(out, 'as2m_train.json')) == [('00W1lcxW-WU_40.000', '/m/a,/m/b'),
                                                             ('synthAAAAAA_30.000', '/m/b,/m/d')]
    assert entries(os.path.join(out, 'as_eval.json')) == [('evalVID0001_5.000', '/m/c')]
    s = json.load(open(os.path.join(out, 'as20k_train.summary.json')))
    assert (s['requested'], s['written'], s['missing'], s['no_audio'], s['failed'], s['duplicate_rows']) == \
        (4, 2, 1, ['silentVIDEO_10.000'], {}, 0)
    assert s['classes_without_clips'] == ['Cat', 'Dog']
    assert open(os.path.join(out, 'as20k_train.missing.txt')).read().split() == ['missingVID1_0.000']
    s = json.load(open(os.path.join(out, 'as2m_train.summary.json')))
    # 4 + 2 rows, one id in both
    assert (s['requested'], s['written'], s['missing'], s['duplicate_rows']) == (5, 2, 1, 1)
    assert list(s['failed']) == ['brokenVIDEO_0.000'] and 'Invalid data' in s['failed']['brokenVIDEO_0.000']
    assert s['classes_without_clips'] == ['Cat']
    s = json.load(open(os.path.join(out, 'as_eval.summary.json')))
    assert (s['requested'], s['written'], s['missing'], s['duplicate_rows']) == (2, 1, 0, 1)
    assert list(s['unreadable']) == ['evalVID0002_0.000']
    assert 'evalVID0002_0.000.wav' in s['unreadable']['evalVID0002_0.000']
    assert summaries['as_eval'] == s
    assert 'as_eval.json: 2 clips requested, 1 written, 0 missing' in printed and '1 unreadable' in printed
    # the JSONs load, labels as multi-hot of the CSV's indices, items equal those of the prepared folder
    ds = data.AVDataset(os.path.join(out, 'as2m_train.json'), meta['class_labels_indices.csv'], mode='eval',
                        audio_length=128, img_size=32, require_labels=True)
    assert [ds[i]['label'].tolist() for i in range(2)] == [[1, 1, 0, 0], [0, 1, 0, 1]]
    ref = data.AVDataset(os.path.join(meta['prepared'], 'data.json'), mode='eval', audio_length=128, img_size=32)
    k = [c['id'] for c in ref.clips].index('synthAAAAAA_30.000')
    assert torch.equal(ds[1]['audio'], ref[k]['audio']) and torch.equal(ds[1]['image'], ref[k]['image'])


def test_audioset_id_formats_and_bad_rows(tmp_path):
    csv_path = tmp_path / 'segments.csv'
    csv_path.write_text(BALANCED)
    mids = {'/m/a': 0, '/m/b': 1, '/m/c': 2}
    requested, _ = splits.read_audioset_segments([str(csv_path)], '{YTID}', mids)
    assert list(requested) == ['00W1lcxW-WU', 'synthAAAAAA', 'missingVID1', 'silentVIDEO']
    requested, _ = splits.read_audioset_segments([str(csv_path)], '{YTID}_{start:06d}', mids)
    assert list(requested)[0] == '00W1lcxW-WU_000040'
    with pytest.raises(ValueError, match=r'segments.csv:4: label ids \[\'/m/b\'\] are not in the label CSV'):
        splits.read_audioset_segments([str(csv_path)], '{YTID}', {'/m/a': 0, '/m/c': 1})
    csv_path.write_text('# c\nabc, 1.5, 11.5, "/m/a"\n')
    with pytest.raises(ValueError, match="segments.csv:2: id format '{YTID}_{start:06d}' does not fit"):
        splits.read_audioset_segments([str(csv_path)], '{YTID}_{start:06d}', mids)
    assert list(splits.read_audioset_segments([str(csv_path)], splits.AUDIOSET_ID, mids)[0]) == ['abc_1.500']
    csv_path.write_text('abc, 1.5, "/m/a"\n')
    with pytest.raises(ValueError, match='segments.csv:1: expected YTID, start_seconds'):
        splits.read_audioset_segments([str(csv_path)], '{YTID}', mids)


@needs_ffmpeg
def test_vggsound_splits_and_retrieval_subset(meta, shared_dir):
    out = str(meta['root'] / 'splits_vgg')
    splits.build_vggsound(meta['prepared'], meta['vggsound.csv'], meta['vgg_classes.csv'], out, workers=2)
    assert entries(os.path.join(out, 'vgg_test.json')) == [('KlsG1EnBEjc_000361', 'vgg_1')]  # 'bird chirping_ tweeting'
    assert entries(os.path.join(out, 'vgg_train.json')) == [('synthVGG001_000030', 'vgg_0')]
    s = json.load(open(os.path.join(out, 'vgg_test.summary.json')))
    assert (s['requested'], s['written'], s['missing']) == (2, 1, 1)
    assert s['classes_without_clips'] == ['dog barking', 'cat meowing']
    assert json.load(open(os.path.join(out, 'vgg_train.summary.json')))['duplicate_rows'] == 1
    # retrieval subset from a template in the public format (placeholder paths), and from an id list
    rows = [('missingVGG1_000000', 'vgg_0'), ('KlsG1EnBEjc_000361', 'vgg_2')]
    template = {'data': [dict(video_id=i, wav=f'<YOUR_VGGS_PATH>/audio/{i}.wav', video_path='<YOUR_VGGS_PATH>/frames/',
                              labels=label) for i, label in rows]}
    json.dump(template, open(meta['root'] / 'template.json', 'w'))
    retrieval = str(meta['root'] / 'retrieval' / 'vgg_retrieval.json')
    s = splits.build_subset(os.path.join(out, 'vgg_test.json'), retrieval, template=str(meta['root'] / 'template.json'))
    assert entries(retrieval) == [('KlsG1EnBEjc_000361', 'vgg_1')]
    assert (s['requested'], s['written'], s['missing'], s['labels_differ_from_template']) == \
        (2, 1, 1, ['KlsG1EnBEjc_000361'])
    a = data.AVDataset(retrieval, mode='eval', audio_length=128, img_size=32)[0]
    b = data.AVDataset(os.path.join(out, 'vgg_test.json'), mode='eval', audio_length=128, img_size=32)[0]
    assert torch.equal(a['audio'], b['audio']) and torch.equal(a['image'], b['image'])
    (meta['root'] / 'ids.txt').write_text('KlsG1EnBEjc_000361\nnotThere_000001\n')
    s = splits.build_subset(os.path.join(out, 'vgg_test.json'), retrieval, ids_file=str(meta['root'] / 'ids.txt'),
                          label_csv=meta['vgg_classes.csv'])
    assert entries(retrieval) == [('KlsG1EnBEjc_000361', 'vgg_1')] and s['missing'] == 1
    assert s['classes_without_clips'] == ['dog barking', 'cat meowing']
    # the public template itself parses: its 1545 ids, none of them prepared here
    s = splits.build_subset(os.path.join(out, 'vgg_test.json'), str(meta['root'] / 'public.json'),
                          template=os.path.join(shared_dir, 'data', 'vggsound_retrieval_split_template.json'))
    assert (s['requested'], s['written'], s['missing']) == (1545, 0, 1545)


def test_vggsound_bad_rows(tmp_path):
    (tmp_path / 'classes.csv').write_text(VGG_LABELS)
    (tmp_path / 'vggsound.csv').write_text('abc,1,dog barking,train\nabd,2,lion roaring,test\n')
    with pytest.raises(ValueError, match=r"vggsound.csv:2: label 'lion roaring' is not a display_name"):
        splits.read_vggsound_csv(str(tmp_path / 'vggsound.csv'), splits.VGGSOUND_ID, str(tmp_path / 'classes.csv'))
    (tmp_path / 'vggsound.csv').write_text('abc,1,dog barking,validation\n')
    with pytest.raises(ValueError, match=r'vggsound.csv:1: expected YTID,start_seconds,label,train\|test'):
        splits.read_vggsound_csv(str(tmp_path / 'vggsound.csv'), splits.VGGSOUND_ID, str(tmp_path / 'classes.csv'))


def test_vggsound_each_split_counts_its_own_duplicates(tmp_path):
    """Duplicate rows counted per split, from the rows of that split (expected by hand: train has
    one id three times and one twice -> 3 repeated rows, test one id twice -> 1)."""
    (tmp_path / 'classes.csv').write_text(VGG_LABELS)
    (tmp_path / 'vggsound.csv').write_text('a,1,dog barking,train\na,1,dog barking,train\nb,2,cat meowing,train\n'
                                           'a,1,dog barking,train\nb,2,cat meowing,train\nc,3,dog barking,test\n'
                                           'c,3,dog barking,test\nd,4,cat meowing,test\n')
    _, counts = splits.read_vggsound_csv(str(tmp_path / 'vggsound.csv'), splits.VGGSOUND_ID,
                                         str(tmp_path / 'classes.csv'))
    assert counts['train']['duplicate_rows'] == 3 and counts['test']['duplicate_rows'] == 1
    (tmp_path / 'prepared').mkdir()  # nothing prepared: every clip is missing, the counts still hold
    summaries = splits.build_vggsound(str(tmp_path / 'prepared'), str(tmp_path / 'vggsound.csv'),
                                      str(tmp_path / 'classes.csv'), str(tmp_path / 'out'))
    assert {k: (s['requested'], s['duplicate_rows']) for k, s in summaries.items()} == \
        {'vgg_train': (2, 3), 'vgg_test': (2, 1)}
    for name, s in summaries.items():
        assert json.load(open(tmp_path / 'out' / f'{name}.summary.json'))['duplicate_rows'] == s['duplicate_rows']


def test_help_says_where_the_metadata_comes_from():
    """--help names the release each non-dataset file comes from (issue 21 item 5c)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = subprocess.run([sys.executable, os.path.join(root, 'scripts', 'splits.py'), '--help'],
                          capture_output=True, text=True, check=True).stdout
    for name in ('class_labels_indices_vgg.csv', 'vgg_test_5_per_class_for_retrieval_template.json',
                 'audioset_eval_5_per_class_for_retrieval_cleaned.json', 'CAV-MAE Sync', 'Without it'):
        assert name in text, name
