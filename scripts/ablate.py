"""
The TG-DP paper's ablations (Tables 5-8) and the CAV-MAE Sync baseline at laptop scale, on synthetic
clips.

    python scripts/ablate.py --quick   # 10 rows x 1 seed x 200 iterations: 13 min on 2 CPU cores
    python scripts/ablate.py           # 10 rows x 3 seeds x 400 iterations: about 80 min on 2 cores

One command trains every row of TG-DP's Tables 5-8 and the CAV-MAE Sync baseline with train.py (a
subprocess per run, config/demo.py plus the row's settings, in OUT/runs/<row>/seed<k>/), then prints
the table in the paper's layout (V->A and A->V R@1/5/10 of the held-out retrieval train.py logs at
the last iteration, mean +- sample standard deviation over seeds) and, per row, the seeds on which
it beats TG-DP (a seed pairs the rows: train.py seeds the initial weights and the batch order with
it), writes OUT/ablation.json (per-seed results, learning curves, the seed-paired counts) and
OUT/ablation.png (the table and, per table and direction, held-out R@1 over iterations: mean over
seeds as a line, min..max as a band). OUT is out/ablate (--quick: out/ablate_quick) unless --out.
Finished runs are skipped and an interrupted one resumes from its checkpoint, so the command can be
stopped and started again; --runs picks rows.

  table 5  single vs dual pass: --method=sync; --method=dualpass --contrastive_mask_ratio=0.75; TG-DP
  table 6  contrastive mask ratio: TG-DP with --contrastive_mask_ratio= 0, 0.2, 0.5, 0.65, 0.75
  table 7  distillation: TG-DP with --dis_weight=0; TG-DP
  table 8  contrastive view: TG-DP with --contrastive_masking= random, guided, gumbel

Fixed before any comparison and the same for every row (ABLATION_DATA, ABLATION_SETTINGS): 400
synthetic clips (scripts/synth.py, seed 0, 10 classes, 320 train / 80 held out) with semantic noise
on top of the demo design (--offscreen 0.1 --silent_objects 0.25 --clutter 2 --hum 0.02);
config/demo.py unchanged (1.25 M parameters, batch 32) for 400 iterations (--quick: 200), held-out
retrieval (diag_mean over the 80 clips, chance R@1 1.25%) every 50 iterations, seeds 0, 1, 2
(--quick: 0). --seeds, --max_iters, --eval_interval override these for trials; the table then states
the settings it used.

Beside each row the table prints the TG-DP paper's numbers for it (PAPER_* below, facts from the
paper: Tables 5-8, VGGSound retrieval R@1/5/10 and AS-20K probing mAP; Table 3, unimodal probing,
below the table). They come from ViT-B models pretrained on the full AudioSet-2M: the laptop rows
are not comparable with them in scale, only in the direction of a difference.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import argparse
import json
import math
import subprocess
import time

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from evaluate import print_table
from scripts.dynamics import read_log
from scripts.plot import class_colour, legend_row, line_panel, save_png
from scripts.synth import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and config/ live here

# -----------------------------------------------------------------------------
# the design
#
# Every row trains config/demo.py's model with train.py (a subprocess per run, out of which only the
# settings below change) on one synthetic data set, for several seeds, and reports the held-out
# retrieval that train.py logs (diag_mean, 80 clips) at the last iteration. The data design and the
# training settings are fixed here, before any comparison, and are the same for every row.

# make_synthetic's settings: the demo's clips plus the kinds of semantic noise TG-DP names
ABLATION_DATA = dict(
    num_clips=400, seed=0, num_classes=10, frame_size=96,
    on_slots=(5, 10),      # the demo's silent stretches: 5-13 of 16 slots hold the event
    offscreen=0.1,         # a tenth of the sound events have their object off screen
    silent_objects=0.25,   # a quarter of the clips show a silent object of another class
    clutter=2,             # two static desaturated shapes in every background
    hum=0.02)              # a steady off-screen tone at a random pitch under every clip
# Chosen before any comparison, from two TG-DP runs only (seed 0, 400 iterations): with on_slots=(4,
# 8), offscreen=0.2, silent_objects=0.5, clutter=3, hum=0.03 held-out R@1 stayed at chance (1.2% /
# 2.5%); with the design above it reached 8.8% V->A / 10.0% A->V (chance 1.25%).
# train.py settings on top of config/demo.py (and the row's), seeds 0..seeds-1
ABLATION_SETTINGS = {
    'full': dict(seeds=3, max_iters=400, eval_interval=50),
    'quick': dict(seeds=1, max_iters=200, eval_interval=50),
}
ABLATION_RUNS = {  # run name -> the row's train.py settings
    'sync': dict(method='sync'),
    'dualpass_75': dict(method='dualpass', contrastive_mask_ratio=0.75),
    'tgdp': dict(method='tgdp'),  # guided view at contrastive ratio 0.5, distillation: TG-DP
    'tgdp_ratio0': dict(method='tgdp', contrastive_mask_ratio=0.0),
    'tgdp_ratio0.2': dict(method='tgdp', contrastive_mask_ratio=0.2),
    'tgdp_ratio0.65': dict(method='tgdp', contrastive_mask_ratio=0.65),
    'tgdp_ratio0.75': dict(method='tgdp', contrastive_mask_ratio=0.75),
    'tgdp_nodis': dict(method='tgdp', dis_weight=0.0),
    'tgdp_random': dict(method='tgdp', contrastive_masking='random'),
    'tgdp_gumbel': dict(method='tgdp', contrastive_masking='gumbel'),
}
# The TG-DP paper's numbers (facts from the paper, full AudioSet-2M pretraining, ViT-B): per row of
# its Tables 5-8, VGGSound retrieval (V->A R@1, R@5, R@10, A->V R@1, R@5, R@10) and AS-20K probing
# mAP.
PAPER_TGDP = (31.3, 54.4, 63.9, 30.3, 53.1, 64.3,
              32.0)  # the TG-DP row of Tables 6-8 (Table 1: A->V R@10 64.2)
PAPER_TABLES = {
    'sync': (27.9, 51.7, 61.8, 23.2, 46.2, 58.1, 30.5),  # Table 5, single pass (CAV-MAE Sync)
    'dualpass_75': (27.1, 51.8, 61.2, 27.4, 50.7, 60.1, 30.4),  # Table 5, dual pass, random 75%
    'tgdp_ratio0': (30.4, 56.0, 64.2, 29.8, 55.6, 64.5, 29.6),  # Table 6, contrastive ratio 0.00
    'tgdp_ratio0.2': (32.5, 55.7, 64.1, 31.7, 54.5, 64.8, 30.4),  # Table 6, 0.20
    'tgdp_ratio0.65': (26.4, 48.1, 57.0, 25.1, 47.0, 58.4, 30.5),  # Table 6, 0.65
    'tgdp_ratio0.75': (27.1, 50.4, 60.1, 26.2, 49.4, 60.8, 30.7),  # Table 6, 0.75
    'tgdp_nodis': (29.5, 54.7, 63.9, 29.1, 53.1, 63.5, 30.5),  # Table 7, without distillation
    'tgdp_random': (31.2, 54.3, 64.8, 30.3, 54.5, 65.7, 30.2),  # Table 8, random mask
    'tgdp_gumbel': (29.6, 56.1, 65.4, 30.5, 54.9, 65.0, 29.8),  # Table 8, Gumbel (probabilistic)
}
# Table 3, unimodal attention probing on AS-20K (mAP): the laptop runs do not probe, printed for
# reference
PAPER_TABLE3 = {'CAV-MAE Sync': {'audio': 29.3, 'vision': 14.3},
                'TG-DP': {'audio': 31.2, 'vision': 17.8}}
PAPER_NOTE = ("paper: the TG-DP paper's numbers for the row (VGGSound retrieval R@1/5/10, AS-20K "
              'probing mAP) after pretraining a ViT-B on the full AudioSet-2M: not comparable in '
              'scale with the laptop rows')
# (title, [(row label, run, paper)]): paper = the row's PAPER_TABLES entry (None: not printed).
# Table 5's TG-DP row shows TG-DP's own numbers, those of Tables 6-8 (the copy of Table 5 at hand
# lists the baselines).
ABLATION_TABLES = [
    ('Table 5: single vs dual pass', [
        ('CAV-MAE Sync (one pass, 75%)', 'sync', PAPER_TABLES['sync']),
        ('dual pass, both random 75%', 'dualpass_75', PAPER_TABLES['dualpass_75']),
        ('TG-DP', 'tgdp', PAPER_TGDP)]),
    ('Table 6: contrastive mask ratio', [
        ('0', 'tgdp_ratio0', PAPER_TABLES['tgdp_ratio0']),
        ('0.2', 'tgdp_ratio0.2', PAPER_TABLES['tgdp_ratio0.2']),
        ('0.5 (TG-DP)', 'tgdp', PAPER_TGDP),
        ('0.65', 'tgdp_ratio0.65', PAPER_TABLES['tgdp_ratio0.65']),
        ('0.75', 'tgdp_ratio0.75', PAPER_TABLES['tgdp_ratio0.75'])]),
    ('Table 7: distillation', [
        ('without', 'tgdp_nodis', PAPER_TABLES['tgdp_nodis']),
        ('with (TG-DP)', 'tgdp', PAPER_TGDP)]),
    ('Table 8: contrastive view', [
        ('random', 'tgdp_random', PAPER_TABLES['tgdp_random']),
        ('guided top-k (TG-DP)', 'tgdp', PAPER_TGDP),
        ('Gumbel top-k', 'tgdp_gumbel', PAPER_TABLES['tgdp_gumbel'])]),
]
RECALLS = [(d, k) for d in ('V->A', 'A->V') for k in ('R@1', 'R@5', 'R@10')]


def ablation_data(data_dir, design):
    """Writes the ablation's synthetic clips into data_dir, or checks that the clips there were made
    with `design`."""
    config_path = os.path.join(data_dir, 'synth_config.json')
    expected = json.loads(json.dumps(design))  # tuples as lists, as synth_config.json holds them
    if os.path.isfile(config_path):
        with open(config_path) as f:
            found = json.load(f)
        found = {k: found.get(k) for k in expected}
        if found != expected:
            raise ValueError(f'{data_dir} holds synthetic clips of another design {found}; the '
                             'ablation needs '
                             f'{expected}: remove the folder or pass another --data')
        return
    make_synthetic(data_dir, **design)


def train_run(run_dir, settings, data_dir, train_args=()):
    """One train.py run (config/demo.py + settings) in run_dir, resumed from its checkpoint if a
    previous attempt stopped; its output goes to run_dir/train.log. Returns the log's records."""
    os.makedirs(run_dir, exist_ok=True)
    resume = os.path.isfile(os.path.join(run_dir, 'ckpt.pt'))
    if not resume and os.path.isfile(os.path.join(run_dir, 'log.jsonl')):
        os.remove(os.path.join(run_dir,
                               'log.jsonl'))  # a start from scratch logs from iteration 1 again
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), os.path.join(ROOT, 'config', 'demo.py'),
           f'--out_dir={run_dir}', f"--train_json={os.path.join(data_dir, 'train.json')}",
           f"--eval_json={os.path.join(data_dir, 'eval.json')}",
           *[f'--{k}={v}' for k, v in settings.items()],
           *train_args] + (['--init_from=resume'] if resume else [])
    with open(os.path.join(run_dir, 'train.log'), 'a') as log:
        log.write(' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(os.path.join(run_dir, 'train.log')) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f'train.py failed in {run_dir} (exit code {proc.returncode}):\n{tail}')
    return read_log(os.path.join(run_dir, 'log.jsonl'))


def ablation_run(out_dir, run, seed, settings, data_dir, design, train_args=()):
    """Result of one (row, seed): {'settings', 'final': {direction: metrics}, 'curve': [[iter, R@1
    V->A, R@1 A->V]]}, from out_dir/runs/<run>/seed<seed>/result.json when a run with the same
    settings finished there before (resumable)."""
    run_dir = os.path.join(out_dir, 'runs', run, f'seed{seed}')
    record = dict(run=run, seed=seed, train=dict(settings, seed=seed), train_args=list(train_args),
                  data=json.loads(json.dumps(design)))  # as result.json holds it
    path = os.path.join(run_dir, 'result.json')
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if done['settings'] != record:
            raise ValueError(f'{path} was made with other settings ({done["settings"]} vs '
                             f'{record}); use another --out')
        return done
    _, retrieval = train_run(run_dir, dict(settings, seed=seed), data_dir, train_args)
    last = settings['max_iters']
    if last not in retrieval:
        raise RuntimeError(f'{run_dir}/log.jsonl has no retrieval at iteration {last} '
                           f'(found {list(retrieval)})')
    result = dict(settings=record, final=retrieval[last],
                  curve=[[it, r['V->A']['R@1'], r['A->V']['R@1']] for it, r in retrieval.items()])
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(path + '.tmp', path)
    return result


def mean_std(values):
    """Mean and sample standard deviation (n - 1; None for one value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, std


def summarize_runs(results):
    """{run: [result per seed]} -> {run: {'seeds', 'mean': {direction: {R@k}}, 'std': ..., 'curve':
    ...}} curve: iterations and, per direction, the mean / min / max R@1 over seeds at each."""
    summary = {}
    for run, per_seed in results.items():
        s = dict(seeds=[r['settings']['seed'] for r in per_seed], mean={'V->A': {}, 'A->V': {}},
                 std={'V->A': {}, 'A->V': {}},
                 final={str(r['settings']['seed']): r['final'] for r in per_seed})
        for d, k in RECALLS:
            s['mean'][d][k], s['std'][d][k] = mean_std([r['final'][d][k] for r in per_seed])
        iters = sorted(set.intersection(*[set(it for it, _, _ in r['curve']) for r in per_seed]))
        curve = dict(iters=iters)
        for col, d in ((1, 'V->A'), (2, 'A->V')):
            at = [[dict((row[0],
                         row[col]) for row in r['curve'])[it] for r in per_seed] for it in iters]
            curve[d] = dict(mean=[sum(v) / len(v) for v in at], min=[min(v) for v in at],
                            max=[max(v) for v in at])
        s['curve'] = curve
        summary[run] = s
    return summary


def ablation_table_rows(summary, tables=ABLATION_TABLES):
    """Printable rows: per table a title row, then per row label | 6 x 'mean ± std' | the paper's
    V->A R@1/5/10, A->V R@1/5/10, AS-20K mAP ('-' where the paper has no such row)."""
    rows = []
    for title, entries in tables:
        rows.append([title] + [''] * 9)
        for label, run, paper in entries:
            if run not in summary:
                continue
            s = summary[run]
            cells = [f"{s['mean'][d][k]:.1f}" +
                     (f" ± {s['std'][d][k]:.1f}" if s['std'][d][k] is not None else '')
                     for d, k in RECALLS]
            ref = ['/'.join(f'{x:.1f}' for x in paper[i:i + 3]) if paper else '-' for i in (0, 3)]
            rows.append(['  ' + label] + cells + ref + [f'{paper[6]:.1f}' if paper else '-'])
    return rows


def paired_wins(summary, reference='tgdp'):
    """{run: {direction: {R@K: [seeds where run > reference, seeds both have]}}} for every run but
    the reference. A seed pairs two rows: train.py seeds the initial weights and the batch order
    with it, so the rows of one seed start from the same model and see the same batches; only the
    row's settings differ."""
    out = {}
    for run, s in summary.items():
        if run == reference or reference not in summary:
            continue
        ref = summary[reference]['final']
        seeds = [seed for seed in s['final'] if seed in ref]
        out[run] = {d: {k: [sum(s['final'][seed][d][k] > ref[seed][d][k] for seed in seeds),
                            len(seeds)]
                        for _, k in RECALLS[:3]} for d in ('V->A', 'A->V')}
    return out


def paired_rows(paired, tables=ABLATION_TABLES):
    """Printable rows of paired_wins: label | 6 x 'better/seeds', in the tables' order."""
    labels = {}
    for title, entries in tables:
        for label, run, _ in entries:
            labels.setdefault(run, f"{title.split(':')[0]}: {label}")
    return [[labels.get(run, run)] + ['{}/{}'.format(*paired[run][d][k]) for d, k in RECALLS]
            for run in labels if run in paired]


ABLATION_HEADER = ['row', 'V->A R@1', 'R@5', 'R@10', 'A->V R@1', 'R@5', 'R@10',
                   'paper V->A 1/5/10', 'paper A->V 1/5/10', 'paper AS-20K']


def paper_table3_lines():
    """The TG-DP paper's Table 3 (unimodal probing), as printed below the ablation table."""
    values = '; '.join(f"{name} audio {v['audio']:.1f}, vision {v['vision']:.1f}"
                       for name, v in PAPER_TABLE3.items())
    return ['TG-DP paper Table 3, unimodal attention probing on AS-20K (mAP, full AudioSet-2M '
            f'pretraining; not run here): {values}']


def ablation_design_text(settings, design, train_args=()):
    """The lines stated next to the table: data design and training settings."""
    noise = ', '.join(f'{k}={tuple(v) if isinstance(v, list) else v}' for k, v in design.items()
                      if k not in ('num_clips', 'seed', 'num_classes', 'frame_size'))
    n = design['num_clips']
    extra = ', plus ' + ' '.join(train_args) if train_args else ''
    return [f"data: {n} synthetic clips (scripts/synth.py, seed {design['seed']}), "
            f"{design['num_classes']} classes, {n - n // 5} train / {n // 5} held out; semantic "
            f"noise: {noise}",
            f"training: config/demo.py (1.25 M parameters, CPU, batch 32) for "
            f"{settings['max_iters']} iterations, the same for every row{extra}; seeds "
            f"0..{settings['seeds'] - 1}; held-out retrieval (diag_mean) every "
            f"{settings['eval_interval']} iterations",
            'cells: mean ± sample standard deviation over seeds (one seed: its value) of R@K '
            f'(percent) at the last iteration; chance R@1 = {100 / (n // 5):.2f}%']


def ablation_plot(summary, out_path, lines, tables=ABLATION_TABLES, width=1600):
    """PNG: the table (text), then the learning curves of held-out R@1 per table and direction: the
    mean over seeds as a line, min..max over seeds as a band."""
    font = ImageFont.load_default()
    rows = ablation_table_rows(summary, tables)
    line_h, panel_h = 15, 300
    table_h = (len(rows) + len(lines) + 4) * line_h
    canvas = Image.new('RGB', (width, table_h + 2 * panel_h), 'white')
    draw = ImageDraw.Draw(canvas)
    cells = [ABLATION_HEADER] + rows
    widths = [max(int(draw.textlength(str(r[i]), font=font)) for r in cells) + 14
              for i in range(len(ABLATION_HEADER))]
    y = 6
    for j, row in enumerate(cells):
        x = 8
        for i, (cell, w) in enumerate(zip(row, widths)):
            tw = draw.textlength(str(cell), font=font)
            draw.text((x if i == 0 else x + w - 14 - tw, y), str(cell), fill='black', font=font)
            x += w
        if j == 0:
            draw.line((8, y + line_h - 1, x, y + line_h - 1), fill='black')
        y += line_h
    y += line_h // 2
    for text in lines:
        draw.text((8, y), text, fill='black', font=font)
        y += line_h
    panel_w = width // len(tables)
    # a run keeps its colour in every panel
    colours = {run: class_colour(k) for k, run in enumerate(ABLATION_RUNS)}
    top = max([v for s in summary.values() for d in ('V->A',
                                                     'A->V') for v in s['curve'][d]['max']] + [1.0])
    ylim = (0.0, 10 * math.ceil(top / 10))  # one scale for every panel
    for p, (title, entries) in enumerate(tables):
        for q, d in enumerate(('V->A', 'A->V')):
            series = []
            for label, run, _ in entries:
                if run in summary:
                    c = summary[run]['curve']
                    series.append(dict(x=c['iters'], y=c[d]['mean'], lo=c[d]['min'], hi=c[d]['max'],
                                       colour=colours[run], label=label))
            box = (p * panel_w, table_h + q * panel_h, (p + 1) * panel_w,
                   table_h + (q + 1) * panel_h - 24)
            line_panel(draw, box, series, f'{title.split(":")[0]}, held-out R@1 {d} (%)',
                       'iteration', font, ylim)
            legend_row(draw, (box[0] + 8, box[3] + 4), [(s['label'], s['colour']) for s in series],
                       font)
    return save_png(canvas, out_path)


def print_ablation(summary, lines, tables=ABLATION_TABLES):
    """Prints the table with the paper's columns, the settings, the paper's Table 3 and the
    seed-paired counts against TG-DP; returns paired_wins(summary)."""
    print_table(ABLATION_HEADER, ablation_table_rows(summary, tables))
    print('\n'.join([PAPER_NOTE] + lines + paper_table3_lines()))
    paired = paired_wins(summary)
    if paired:
        print('\nseeds on which the row beats TG-DP (strictly higher R@K; a seed pairs the rows: '
              'same initial '
              'weights, same batches)')
        print_table(['row'] + ABLATION_HEADER[1:7], paired_rows(paired, tables))
    return paired


def ablate(out_dir, mode='full', runs=None, seeds=None, max_iters=None, eval_interval=None,
           data_dir=None, design=ABLATION_DATA, train_args=(), tables=ABLATION_TABLES):
    """Trains every (row, seed) of the ablation not done yet in out_dir, then prints the table,
    writes out_dir/ablation.json and out_dir/ablation.png. seeds / max_iters / eval_interval
    override ABLATION_SETTINGS[mode] (then the table states the changed settings). Returns the JSON
    dict."""
    settings = dict(ABLATION_SETTINGS[mode])
    for key, value in (('seeds', seeds), ('max_iters', max_iters),
                       ('eval_interval', eval_interval)):
        if value is not None:
            settings[key] = value
    runs = list(runs or ABLATION_RUNS)
    unknown = [r for r in runs if r not in ABLATION_RUNS]
    if unknown:
        raise ValueError(f'unknown ablation runs {unknown}; known: {list(ABLATION_RUNS)}')
    data_dir = data_dir or os.path.join(out_dir, 'data')
    ablation_data(data_dir, design)
    jobs = [(run,
             seed) for seed in range(settings['seeds']) for run in runs]  # every row's seed 0 first
    results = {run: [] for run in runs}
    t0 = time.time()
    bar = tqdm(jobs, desc='ablation runs', unit='run')
    for run, seed in bar:
        bar.set_postfix_str(f'{run} seed {seed}')
        train_settings = dict(ABLATION_RUNS[run], max_iters=settings['max_iters'],
                              eval_interval=settings['eval_interval'])
        r = ablation_run(out_dir, run, seed, train_settings, data_dir, design, train_args)
        results[run].append(r)
        bar.write(f"{run} seed {seed}: R@1 V->A {r['final']['V->A']['R@1']:.1f} "
                  f"A->V {r['final']['A->V']['R@1']:.1f}")
    summary = summarize_runs(results)
    lines = ablation_design_text(settings, design, train_args)
    print(f'\nablation ({mode}, {len(jobs)} runs, {time.time() - t0:.0f} s)')
    paired = print_ablation(summary, lines, tables)
    out = dict(mode=mode, settings=settings, data=design, train_args=list(train_args), notes=lines,
               runs=summary, paired=paired,
               tables=[dict(title=title, rows=[dict(label=label, run=run, paper=paper)
                                               for label, run, paper in entries])
                       for title, entries in tables],
               paper_table3=PAPER_TABLE3)
    json_path = os.path.join(out_dir, 'ablation.json')
    with open(json_path, 'w') as f:
        json.dump(out, f, indent=1)
    png = ablation_plot(summary, os.path.join(out_dir, 'ablation.png'),
                        [PAPER_NOTE] + lines + paper_table3_lines(), tables)
    print(f'wrote {json_path} and {png}')
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true',
                        help='the quick variant (13 min on 2 cores), not the full one (80 min)')
    parser.add_argument('--out',
                        help='output folder (default: out/ablate or out/ablate_quick); finished '
                             'runs are skipped')
    parser.add_argument('--runs', nargs='+', choices=list(ABLATION_RUNS),
                        help='only these rows (default: all)')
    parser.add_argument('--data',
                        help='folder of the synthetic clips (default: OUT/data, written if absent)')
    parser.add_argument('--seeds', type=int,
                        help='override the fixed settings (trials only: the table states it)')
    parser.add_argument('--max_iters', type=int, help='override the fixed settings (trials only)')
    parser.add_argument('--eval_interval', type=int,
                        help='override the fixed settings (trials only)')
    args = parser.parse_args(argv)
    out = args.out or os.path.join('out', 'ablate_quick' if args.quick else 'ablate')
    ablate(out, 'quick' if args.quick else 'full', args.runs, args.seeds, args.max_iters,
           args.eval_interval, args.data)


if __name__ == '__main__':
    main()
