"""
Shared Pillow helpers of the picture tools (scripts/localize.py, reconstruct.py, embed.py, cases.py,
dynamics.py, ablate.py): colour maps and the class palette, frames and spectrograms as RGB arrays,
markers, line charts with round ticks, legends, panel titles; and the model options every tool's
command line shares. Pillow only, no plotting library. A library for the other scripts, not a
program.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up

import math

import torch
from PIL import ImageFont

import data

# anchor colours of two perceptual colour maps, linearly interpolated
TURBO = [(48, 18, 59), (70, 134, 251), (27, 229, 181), (164, 252, 60), (251, 185, 56),
         (228, 70, 10), (122, 4, 3)]
MAGMA = [(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)]
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # tab10


def colormap(x, anchors):
    """x (H, W) in [0, 1] -> (H, W, 3) uint8 numpy array."""
    lut = torch.tensor(anchors, dtype=torch.float32)  # (K, 3)
    pos = x.float().clamp(0, 1) * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return ((1 - frac) * lut[lo] + frac * lut[lo + 1]).round().byte().numpy()


def unit_range(x, lo=None, hi=None):
    """Min-max scale to [0, 1] (a constant input maps to 0)."""
    lo = x.min() if lo is None else lo
    hi = x.max() if hi is None else hi
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def frame_to_rgb(image):
    """Normalised frame (3, H, W) -> (H, W, 3) uint8, undoing data.py's ImageNet normalisation."""
    mean = torch.tensor(data.IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(data.IMAGE_STD, dtype=torch.float32)[:, None, None]
    rgb = (image.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0) * 255).round().byte().numpy()


def spectrogram_to_rgb(audio, lo=None, hi=None):
    """Segment (L, F) -> (F, L, 3) uint8: time left to right, low frequencies at the bottom."""
    x = audio.float().cpu().T.flip(0)  # (F, L)
    return colormap(unit_range(x, lo, hi), MAGMA)


def class_colour(k):
    """Colour of class (or run) k: tab10, then golden-ratio hues."""
    if k < len(PALETTE):
        return PALETTE[k]
    h = (k * 0.618033988749895) % 1.0
    i, f = int(h * 6), h * 6 - int(h * 6)
    p, q, t = 0.25, 0.9 - 0.65 * f, 0.25 + 0.65 * f
    r, g, b = [(0.9, t, p), (q, 0.9, p), (p, 0.9, t), (p, q, 0.9), (t, p, 0.9), (0.9, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def marker(draw, x, y, r, shape, colour):
    """A filled 'circle' or 'triangle' of radius r at (x, y) with a darker outline."""
    outline = tuple(int(c * 0.6) for c in colour)
    if shape == 'circle':
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=outline)
    else:
        draw.polygon([(x, y - 1.2 * r), (x - 1.1 * r, y + 0.8 * r), (x + 1.1 * r, y + 0.8 * r)],
                     fill=colour, outline=outline)


def safe_name(clip_id):
    """A clip id as a file name."""
    return ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in str(clip_id))


def save_png(canvas, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def checkpoint_titles(ckpt, compare=None, titles=None):
    """Panel titles of one checkpoint or two side by side: titles, or the checkpoints' folders."""
    paths = [ckpt] + ([compare] if compare else [])
    if titles:
        if len(titles) != len(paths):
            raise ValueError(f'--titles needs {len(paths)} names, got {len(titles)}')
        return titles
    return [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]


def default_dtype(device):
    """--dtype default: bf16 autocast on GPU, full precision elsewhere."""
    return 'bfloat16' if torch.device(device).type == 'cuda' else 'float32'


def add_model_args(parser):
    """The options of a tool that runs a checkpoint: --ckpt, --weights, --device, --dtype, ..."""
    parser.add_argument('--ckpt', required=True,
                        help='train.py checkpoint or official CAV-MAE Sync / TG-DP release')
    parser.add_argument('--weights', choices=('model', 'teacher'), default='model',
                        help='train.py checkpoints: student or EMA teacher')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                        help="autocast precision (default: 'bfloat16' on cuda, 'float32' on cpu)")
    parser.add_argument('--batch_size', type=int, default=8,
                        help='clips per forward (each with all its frames)')
    parser.add_argument('--num_workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='data loading processes')
    parser.add_argument('--num_frames', type=int, default=16,
                        help='frames (and aligned segments) per clip')


def add_compare_args(parser):
    """The options of a tool that draws one or two checkpoints side by side."""
    parser.add_argument('--cache', help='directory for extracted features, reused across runs')
    parser.add_argument('--compare', help='a second checkpoint, drawn beside the first')
    parser.add_argument('--titles', nargs='+',
                        help="panel titles (default: the checkpoints' folder names)")


def pick_frame(frame, T):
    """The frame a picture shows: --frame, or the middle one of T; an error outside 0..T-1."""
    t = T // 2 if frame is None else frame
    if not 0 <= t < T:
        raise ValueError(f'--frame {t} is outside 0..{T - 1}')
    return t


def parse_model_args(parser, argv=None):
    """parser.parse_args with --dtype filled in from --device."""
    args = parser.parse_args(argv)
    args.dtype = args.dtype or default_dtype(args.device)
    return args


# -----------------------------------------------------------------------------
# line charts

def nice_ticks(lo, hi, count=5):
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 5, 10) if s * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def lighter(colour, amount=0.75):
    return tuple(int(round(c + (255 - c) * amount)) for c in colour)


def data_range(series, ylim=None):
    """(x_lo, x_hi, y_lo, y_hi) of the series (bands included), widened when flat, y padded 5%."""
    xs = [x for s in series for x in s['x']]
    ys = [y for s in series
          for y in list(s['y']) + list(s.get('lo') or []) + list(s.get('hi') or [])]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = ylim if ylim else (min(ys), max(ys))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    if not ylim:
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad
    return x_lo, x_hi, y_lo, y_hi


def draw_axes(draw, left, plot, ranges, to_px, xlabel, font):
    """Frame, grid lines and round ticks of a plot area plot = (px0, py0, px1, py1)."""
    px0, py0, px1, py1 = plot
    x_lo, x_hi, y_lo, y_hi = ranges
    draw.rectangle(plot, outline=(160, 160, 160))
    for t in nice_ticks(y_lo, y_hi):
        _, y = to_px(x_lo, t)
        draw.line((px0 - 3, y, px0, y), fill='black')
        draw.line((px0 + 1, y, px1 - 1, y), fill=(235, 235, 235))
        draw.text((left + 2, y - 6), f'{t:g}', fill='black', font=font)
    for t in nice_ticks(x_lo, x_hi):
        x, _ = to_px(t, y_lo)
        draw.line((x, py1, x, py1 + 3), fill='black')
        draw.text((x - 8, py1 + 4), f'{t:g}', fill='black', font=font)
    draw.text(((px0 + px1) // 2 - 20, py1 + 16), xlabel, fill='black', font=font)


def line_panel(draw, box, series, title='', xlabel='', font=None, ylim=None):
    """Line chart in box (left, top, right, bottom) of an ImageDraw: series = list of dicts with x,
    y (lists), colour, and optional lo, hi (a band drawn lighter under the line, e.g. the spread
    over seeds). Axes with round ticks; ylim (lo, hi) fixes the y range."""
    font = font or ImageFont.load_default()
    left, top, right, bottom = box
    plot = px0, py0, px1, py1 = left + 44, top + 18, right - 8, bottom - 30  # inside the labels
    draw.text((px0, top + 2), title, fill='black', font=font)
    if not any(s['x'] for s in series):
        draw.text((px0, (py0 + py1) // 2), 'no data', fill='black', font=font)
        return
    ranges = x_lo, x_hi, y_lo, y_hi = data_range(series, ylim)

    def to_px(x, y):
        return (px0 + (x - x_lo) / (x_hi - x_lo) * (px1 - px0),
                py1 - (y - y_lo) / (y_hi - y_lo) * (py1 - py0))

    draw_axes(draw, left, plot, ranges, to_px, xlabel, font)
    for s in series:  # bands first, so that no line is hidden under another series' band
        if s.get('lo') is not None and len(s['x']) > 1:
            draw.polygon([to_px(x, y) for x, y in zip(s['x'], s['hi'])] +
                         [to_px(x, y) for x, y in zip(s['x'][::-1], s['lo'][::-1])],
                         fill=lighter(s['colour']))
    for s in series:
        points = [to_px(x, y) for x, y in zip(s['x'], s['y'])]
        if len(points) > 1:
            draw.line(points, fill=s['colour'], width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=s['colour'])


def legend_row(draw, xy, entries, font=None):
    """Coloured swatches with labels in one row from xy: entries = [(label, colour)]."""
    font = font or ImageFont.load_default()
    x, y = xy
    for label, colour in entries:
        draw.rectangle((x, y + 2, x + 18, y + 10), fill=colour)
        draw.text((x + 22, y), label, fill='black', font=font)
        x += 22 + int(draw.textlength(label, font=font)) + 16


if __name__ == '__main__':
    import argparse
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
