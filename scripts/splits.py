r"""
Labelled split JSONs from the official AudioSet / VGGSound metadata and a folder written by
scripts/prepare.py, and retrieval subsets of them. This project downloads nothing: bring your own
copies of the videos (named as below) and of the metadata.

    # AudioSet: as20k_train.json (balanced), as2m_train.json (balanced + unbalanced), as_eval.json
    python scripts/splits.py audioset --prepared data/audioset --out data/audioset \
        --label_csv class_labels_indices.csv --balanced balanced_train_segments.csv \
        --unbalanced unbalanced_train_segments.csv --eval eval_segments.csv
    # VGGSound: vgg_train.json, vgg_test.json
    python scripts/splits.py vggsound --prepared data/vggsound --out data/vggsound \
        --csv vggsound.csv --label_csv class_labels_indices_vgg.csv
    # retrieval subsets: from a template JSON (its placeholder paths replaced) or an id list
    python scripts/splits.py subset --data data/vggsound/vgg_test.json \
        --out data/vggsound/retrieval.json \
        --template vgg_test_5_per_class_for_retrieval_template.json
    python scripts/splits.py subset --data data/audioset/as_eval.json \
        --out data/audioset/retrieval.json \
        --template audioset_eval_5_per_class_for_retrieval_cleaned.json

The CSVs are read as published. AudioSet segment CSVs: '#' comment lines, rows
`YTID, start_seconds, end_seconds, "mid1,mid2"`; the label CSV `index,mid,display_name` (527
classes). vggsound.csv: no header, rows `YTID,start_seconds,label text,train|test`, the label text
matched to the class CSV's display_name, whose commas are written `_` ('bird chirping_ tweeting').
Duplicate rows (the same clip id twice in a split) are merged, their labels united, and counted.
Every clip found in the prepared folder has its wav and frame headers checked (--no_check skips
that).

Each JSON gets a summary, printed and written next to it as <name>.summary.json: clips requested,
written, missing (ids in <name>.missing.txt: never downloaded), without an audio track, failed in
preparation (ffmpeg's message, from the prepared folder's failed.json), unreadable (the reason),
duplicate rows of that split, classes with no clip. A split JSON may live in another folder than the
prepared clips (paths are relative to it). A subset takes its labels from the split, lists template
labels that differ (labels_differ_from_template), and classifies ids the split lacks with the
split's own summary.

Clip ids (--id_format, a Python format of YTID and start; whole-second starts are integers):

    dataset   default --id_format  file name               alternatives
    AudioSet  {YTID}_{start:.3f}   --PJHxphWEs_30.000.mp4  {YTID} (--PJHxphWEs.mp4),
                                                           {YTID}_{start:06d}
    VGGSound  {YTID}_{start:06d}   ---g-f_I2yQ_000001.mp4  any format of YTID, start

Where the metadata comes from:
- AudioSet segment CSVs and class_labels_indices.csv: the AudioSet release (Google); the CAV-MAE
  repository ships the same label CSV as
  src/preprocess/sample_datafiles/class_labels_indices_as.csv.
- vggsound.csv: the VGGSound release (Oxford VGG).
- class_labels_indices_vgg.csv (309 classes, mids vgg_0 ... vgg_308, in the releases' order, not
  alphabetical): not part of VGGSound; it is CAV-MAE's (its data-list table,
  pretrained_model/README.md), also in the CAV-MAE Sync repository as
  datafiles/class_labels_indices_vgg.csv. Without it, write `index,mid,display_name` yourself from
  the label texts of vggsound.csv (commas as `_`): the splits and a probe trained here work, but
  class indices then differ from the releases' (their fine-tuned heads and per-class numbers).
- The VGGSound retrieval template (1545 test clips, 5 per class, paths `<YOUR_VGGS_PATH>`): CAV-MAE
  Sync's datafiles/vgg_test_5_per_class_for_retrieval_template.json (../shared/data holds it as
  vggsound_retrieval_split_template.json, the same bytes). CAV-MAE's own subset,
  vgg_test_5_per_class_for_retrieval_cleaned.json from its data-list table, is read the same way.
- The AudioSet retrieval subset: CAV-MAE's audioset_eval_5_per_class_for_retrieval_cleaned.json
  (its data-list table; CAV-MAE Sync and TG-DP ship none). Give it as --template. Without it there
  is no retrieval set comparable with the papers; an id list (--ids, one id a line) of your choice
  gives a local one.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import csv
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from data import check_clip, read_label_csv
from scripts.prepare import prepared_ids, read_failures

# e.g. --PJHxphWEs_30.000.mp4; '{YTID}' for downloads named by YTID only
AUDIOSET_ID = '{YTID}_{start:.3f}'
VGGSOUND_ID = '{YTID}_{start:06d}'  # e.g. ---g-f_I2yQ_000001.mp4


def clip_id_for(id_format, ytid, start, where):
    """A downloader's file stem from a CSV row: id_format with {YTID} and {start} (an int when whole
    seconds, so both '{start:06d}' and '{start:.3f}' work)."""
    start = int(start) if float(start).is_integer() else float(start)
    try:
        return id_format.format(YTID=ytid, start=start)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{where}: id format {id_format!r} does not fit YTID={ytid!r} "
                         f"start={start!r}: {e}") from e


def add_row(requested, clip_id, mids, counts):
    """requested {id: [mids]} in CSV order; a repeated id merges its labels and counts as a
    duplicate."""
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
                    raise ValueError(f'{path}:{line}: expected YTID, start_seconds, end_seconds, '
                                     f'"labels", got {row}')
                ytid, start, _, labels = row
                mids = [m.strip() for m in labels.split(',') if m.strip()]
                unknown = [m for m in mids if m not in mid_to_index]
                if unknown:
                    raise ValueError(f'{path}:{line}: label ids {unknown} are not in the label CSV')
                clip_id = clip_id_for(id_format, ytid.strip(), float(start), f'{path}:{line}')
                add_row(requested, clip_id, mids, counts)
    return requested, counts


def label_key(text):
    """VGGSound label text as in vggsound.csv ('bird chirping, tweeting') and as in the class CSV,
    where commas were written as underscores ('bird chirping_ tweeting')."""
    return ' '.join(text.replace('_', ',').split()).lower()


def read_vggsound_csv(path, id_format, label_csv):
    """vggsound.csv (no header; rows YTID,start_seconds,label text,train|test) -> ({'train': {id:
    [mid]}, 'test': {...}} with the class CSV's mids (matched by display_name), {'train':
    {'duplicate_rows': n}, 'test': {...}}: each split counts its own repeated rows)."""
    mid_to_index, names = read_label_csv(label_csv)
    index_to_mid = {i: m for m, i in mid_to_index.items()}
    by_name = {label_key(name): index_to_mid[i] for i, name in enumerate(names)}
    splits = {'train': {}, 'test': {}}
    counts = {split: Counter(duplicate_rows=0) for split in splits}
    with open(path, newline='') as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or row[0].lstrip().startswith('#'):
                continue
            if len(row) != 4 or row[3].strip() not in splits:
                raise ValueError(f'{path}:{line}: expected YTID,start_seconds,label,train|test, '
                                 f'got {row}')
            ytid, start, text, split = (x.strip() for x in row)
            if label_key(text) not in by_name:
                raise ValueError(f'{path}:{line}: label {text!r} is not a display_name of '
                                 f'{label_csv}')
            try:
                start = float(start)
            except ValueError:
                message = f'{path}:{line}: start_seconds {start!r} is not a number'
                raise ValueError(message) from None
            add_row(splits[split], clip_id_for(id_format, ytid, start, f'{path}:{line}'),
                    [by_name[label_key(text)]], counts[split])
    return splits, counts


def prepared_clips(prepared, ids, num_frames=16, check=True, workers=4):
    """Which requested ids a `prepare` folder holds -> (clips {id: (wav, frames folder)}, reasons
    {id: (kind, message)} for no_audio / failed (from failed.json) / unreadable ones)."""
    present = prepared_ids(prepared, num_frames)
    failures = read_failures(prepared)
    found = [i for i in ids if i in present]
    reasons = {i: ('no_audio' if failures[i]['error'] == 'no_audio' else 'failed',
                   failures[i]['message'])
               for i in ids if i not in present and i in failures}
    if check:
        with ThreadPoolExecutor(workers) as pool:
            def problem(i):
                wav = os.path.join(prepared, 'audio', f'{i}.wav')
                return check_clip(dict(id=i, wav=wav, video_path=prepared), num_frames)
            problems = list(tqdm(pool.map(problem, found), total=len(found), desc='checking clips',
                                 leave=False))
        reasons.update({i: ('unreadable', p) for i, p in zip(found, problems) if p})
    clips = {i: (os.path.join(prepared, 'audio', f'{i}.wav'), prepared) for i in found
             if i not in reasons}
    return clips, reasons


def write_split(out_json, requested, clips, reasons, label_csv=None, duplicate_rows=0, extra=None):
    """requested {id: [mids]} -> out_json with the clips that are ready (paths relative to the JSON)
    and a summary printed and written next to it: <name>.summary.json (counts, no-audio ids,
    failed and unreadable ids with their messages, classes with no clip) and <name>.missing.txt
    (ids with no prepared clip and no recorded failure: usually videos that were never
    downloaded)."""
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
                   no_audio=sorted(kinds['no_audio']), failed=kinds['failed'],
                   unreadable=kinds['unreadable'], duplicate_rows=duplicate_rows, **(extra or {}))
    line = (f"{out_json}: {len(requested)} clips requested, {len(entries)} written, "
            f"{len(missing)} missing (ids in {stem}.missing.txt), "
            f"{len(kinds['no_audio'])} without an audio track, "
            f"{len(kinds['failed'])} failed in preparation, {len(kinds['unreadable'])} unreadable, "
            f"{duplicate_rows} duplicate rows")
    if label_csv:
        mid_to_index, names = read_label_csv(label_csv)
        covered = {m for e in entries for m in e['labels'].split(',') if m}
        empty = [names[i] for m, i in sorted(mid_to_index.items(), key=lambda x: x[1])
                 if m not in covered]
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
        raise ValueError('--unbalanced needs --balanced too: '
                         'AS-2M training is balanced + unbalanced')
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


def build_vggsound(prepared, csv_path, label_csv, out, id_format=VGGSOUND_ID, num_frames=16,
                   check=True, workers=4):
    """vggsound.csv -> OUT/vgg_train.json and OUT/vgg_test.json with summaries (each counting its
    own duplicate rows). Returns {name: summary}."""
    splits, counts = read_vggsound_csv(csv_path, id_format, label_csv)
    summaries = {}
    for split, requested in splits.items():
        clips, reasons = prepared_clips(prepared, list(requested), num_frames, check, workers)
        summaries[f'vgg_{split}'] = write_split(os.path.join(out, f'vgg_{split}.json'), requested,
                                                clips, reasons, label_csv,
                                                counts[split]['duplicate_rows'])
    return summaries


def build_subset(data_json, out_json, ids_file=None, template=None, label_csv=None):
    """A subset of a labelled split (retrieval sets) -> out_json in the order of an id list (one id
    a line) or of a template JSON whose placeholder paths are replaced by the split's prepared
    files. Labels come from the split (the official CSV); the summary counts template labels that
    differ. Ids the split lacks are classified with the split's own summary (no audio, failed,
    unreadable)."""
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
    requested = {i: [m for m in (source[i]['labels'] if i in source else labels or '').split(',')
                     if m] for i, labels in wanted.items()}
    clips = {i: (os.path.join(root, e['wav']), os.path.join(root, e['video_path']))
             for i, e in source.items()}
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
    relative = os.path.relpath(data_json, os.path.dirname(os.path.abspath(out_json)))
    return write_split(out_json, requested, clips, reasons, label_csv,
                       extra=dict(source=relative, labels_differ_from_template=differ))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('audioset', help='AudioSet segment CSVs + a prepared folder -> split JSONs')
    p.add_argument('--prepared', required=True, help='folder written by scripts/prepare.py')
    p.add_argument('--label_csv', required=True, help='class_labels_indices.csv (527 classes)')
    p.add_argument('--out', required=True,
                   help='folder for as20k_train.json, as2m_train.json, as_eval.json')
    p.add_argument('--balanced', help='balanced_train_segments.csv (-> as20k_train.json)')
    p.add_argument('--unbalanced',
                   help='unbalanced_train_segments.csv (+ balanced -> as2m_train.json)')
    p.add_argument('--eval', dest='eval_csv', help='eval_segments.csv (-> as_eval.json)')
    p.add_argument('--id_format', default=AUDIOSET_ID,
                   help="clip id (video file stem) of a row: '{YTID}_{start:.3f}' (default), "
                        "'{YTID}', or any format of YTID and start")
    p = sub.add_parser('vggsound', help='vggsound.csv + a prepared folder -> train / test JSONs')
    p.add_argument('--prepared', required=True, help='folder written by scripts/prepare.py')
    p.add_argument('--csv', required=True,
                   help='vggsound.csv (YTID,start_seconds,label,train|test; no header)')
    p.add_argument('--label_csv', required=True,
                   help='the 309-class CSV index,mid,display_name (class_labels_indices_vgg.csv)')
    p.add_argument('--out', required=True, help='folder for vgg_train.json, vgg_test.json')
    p.add_argument('--id_format', default=VGGSOUND_ID,
                   help="clip id of a row (default '{YTID}_{start:06d}')")
    for p in sub.choices['audioset'], sub.choices['vggsound']:
        p.add_argument('--num_frames', type=int, default=16)
        p.add_argument('--no_check', action='store_true',
                       help="don't open every wav and frame header")
        p.add_argument('--workers', type=int, default=4, help='threads checking files')
    p = sub.add_parser('subset',
                       help='a subset of a labelled split (retrieval sets) from ids or a template')
    p.add_argument('--data', required=True, help='labelled split JSON (e.g. vgg_test.json)')
    p.add_argument('--out', required=True)
    p.add_argument('--ids', help='text file, one clip id a line')
    p.add_argument('--template', help='JSON listing the clips '
                                      '(e.g. vgg_test_5_per_class_for_retrieval_template.json)')
    p.add_argument('--label_csv', help='to list classes with no clip in the summary')
    args = parser.parse_args()
    if args.command == 'audioset':
        build_audioset(args.prepared, args.label_csv, args.out, args.balanced, args.unbalanced,
                       args.eval_csv, args.id_format, args.num_frames, not args.no_check,
                       args.workers)
    elif args.command == 'vggsound':
        build_vggsound(args.prepared, args.csv, args.label_csv, args.out, args.id_format,
                       args.num_frames, not args.no_check, args.workers)
    else:
        build_subset(args.data, args.out, args.ids, args.template, args.label_csv)


if __name__ == '__main__':
    main()
