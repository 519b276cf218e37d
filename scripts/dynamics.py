"""
Training dynamics (TG-DP supplement, Fig. 1): the loss terms of two or more runs side by side, from
their train.py log.jsonl.

    python scripts/dynamics.py --logs out/sync/log.jsonl out/tgdp/log.jsonl [--labels sync tgdp] \
        --out dynamics.png

One panel per logged term (--keys, default the reconstruction losses rec_a, rec_v and the
contrastive loss con; e.g. dis for distillation), one line per run, per logged step (train.py logs
every log_interval iterations). A resumed run repeats iterations: the last record of an iteration
counts. Runs are named by --labels or by their logs' folder names; the last value of every term is
printed.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import json

from PIL import Image, ImageDraw, ImageFont

from scripts.plot import class_colour, legend_row, line_panel, save_png

DYNAMICS_KEYS = {'rec_a': 'reconstruction loss, audio', 'rec_v': 'reconstruction loss, visual',
                 'con': 'contrastive loss (InfoNCE)'}


def read_log(path):
    """train.py's log.jsonl -> (training records {iter: record}, retrieval {iter: results}); a
    resumed run repeats iterations: the last record of an iteration wins."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such log (train.py writes out_dir/log.jsonl)')
    train, retrieval = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}, line {n}: not JSON ({e})') from None
            if 'retrieval' in record:
                retrieval[record['iter']] = record['retrieval']
            else:
                train[record['iter']] = record
    return dict(sorted(train.items())), dict(sorted(retrieval.items()))


def run_curves(path, keys):
    """{key: (iters, values)} of one run's log; every training record must hold every key."""
    train, _ = read_log(path)
    if not train:
        raise ValueError(f'{path} holds no training records')
    curves = {}
    for key in keys:
        missing = [it for it, r in train.items() if key not in r]
        if missing:
            raise ValueError(f'{path}: iteration {missing[0]} has no {key!r} '
                             f'(keys: {sorted(train[missing[0]])})')
        curves[key] = (list(train), [train[it][key] for it in train])
    return curves


def dynamics_plot(logs, out_path, labels=None, keys=('rec_a', 'rec_v', 'con'), width=1200,
                  height=380):
    """Training dynamics of two or more runs side by side (TG-DP supplement, Fig. 1): one panel per
    loss term of train.py's log (logged every log_interval steps), one line per run. Writes a
    (width, height) PNG and returns {label: {key: (iters, values)}}."""
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in logs]
    if len(labels) != len(logs):
        raise ValueError(f'{len(logs)} logs but {len(labels)} labels')
    curves = {label: run_curves(path, keys) for path, label in zip(logs, labels)}
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    colours = {label: class_colour(k) for k, label in enumerate(labels)}
    legend_row(draw, (10, 6), [(label, colours[label]) for label in labels], font)
    panel_w = width // len(keys)
    for j, key in enumerate(keys):
        series = [dict(x=curves[label][key][0], y=curves[label][key][1],
                       colour=colours[label]) for label in labels]
        box = (j * panel_w, 24, (j + 1) * panel_w, height)
        line_panel(draw, box, series, DYNAMICS_KEYS.get(key, key), 'iteration', font)
    save_png(canvas, out_path)
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--logs', nargs='+', required=True, help='log.jsonl of each run')
    parser.add_argument('--labels', nargs='+', help="run names (default: the logs' folder names)")
    parser.add_argument('--keys', nargs='+', default=['rec_a', 'rec_v', 'con'],
                        help='logged terms, one panel each')
    parser.add_argument('--out', required=True, help='output .png')
    parser.add_argument('--width', type=int, default=1200)
    parser.add_argument('--height', type=int, default=380)
    args = parser.parse_args(argv)
    curves = dynamics_plot(args.logs, args.out, args.labels, args.keys, args.width, args.height)
    for label, c in curves.items():
        print(f"{label}: {len(c[args.keys[0]][0])} logged steps, last " +
              ', '.join(f'{k} {v[1][-1]:.4f}' for k, v in c.items()))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
