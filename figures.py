"""Pictures, drawn with PIL alone: image grids with labels, line plots, the rate per layer
(figure 5, one run or several), and the run folder's figures (curve.png: bits/dim;
grad_norm.png: the paper's figure 6, the gradient norm against the skip threshold). Every PNG
is written whole, then renamed, through tf.io.gfile (gs:// too)."""
import io
import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import files


def grid(rows):
    """(rows, cols, H, W, 3) uint8 -> one image with a 1-pixel gap."""
    r, c, h, w, _ = rows.shape
    out = np.full((r * (h + 1) - 1, c * (w + 1) - 1, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            out[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = rows[i, j]
    return out


def save_png(image, path):
    """Written whole, then renamed (a reader never sees half a file); gs:// paths too."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    files.write_whole(path, buffer.getvalue(), '.tmp.png')


def write_png(image, path):
    """save_png for the command line: a failed write is one error line."""
    with files.writing(path, 'the picture'):
        save_png(image, path)


def _font(size=12):
    return ImageFont.load_default(size=size)


def labelled(image, top=(), left=(), cell=None, scale=1):
    """Upscale a grid by `scale` and write a label above each column / beside each row."""
    img = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    font = _font()
    lh = 14 * max((len(str(t).split('\n')) for t in top), default=0)
    lw = max((int(font.getlength(str(t))) + 8 for t in left), default=0)
    out = Image.new('RGB', (img.width + lw, img.height + lh), 'white')
    out.paste(img, (lw, lh))
    draw = ImageDraw.Draw(out)
    ch, cw = (cell[0] + 1) * scale, (cell[1] + 1) * scale
    for j, text in enumerate(top):
        draw.multiline_text((lw + j * cw + 2, 1), str(text), fill='black', font=font, spacing=2)
    for i, text in enumerate(left):
        draw.text((2, lh + i * ch + ch // 2 - 7), str(text), fill='black', font=font)
    return np.asarray(out)


def titled(image, text):
    """A line of text above an image."""
    out = Image.new('RGB', (max(image.shape[1], int(_font().getlength(text)) + 8), image.shape[0] + 18), 'white')
    out.paste(Image.fromarray(image), (0, 18))
    ImageDraw.Draw(out).text((4, 2), text, fill='black', font=_font())
    return np.asarray(out)


def _nice_ceiling(v):
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v: round axis ends."""
    if v <= 0:
        return 1.
    base = 10. ** math.floor(math.log10(v))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= v * (1 - 1e-9))


COLOURS = [(31, 90, 180), (220, 110, 20), (40, 150, 60), (190, 40, 40), (120, 80, 170), (90, 90, 90)]


def line_plot(draw, box, series, title, xlabel, ylabel, xticks, marks=(), ymax=None):
    """Lines through the points of `series` [(xs, ys, label)] in box=(left, top, right,
    bottom), each in its colour, with a legend when there is more than one; xticks
    [(x, label)]; marks [(x, label)] become dotted vertical lines."""
    left, top, right, bottom = box
    font = _font()
    all_x = [x for xs, _, _ in series for x in xs]
    x0, x1 = min(all_x), max(all_x) if max(all_x) > min(all_x) else min(all_x) + 1
    y1 = ymax or _nice_ceiling(max(y for _, ys, _ in series for y in ys))
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    py = lambda y: bottom - y / y1 * (bottom - top)
    draw.rectangle(box, outline='black')
    for x, label in marks:
        for y in range(int(top), int(bottom), 6):
            draw.line([(px(x), y), (px(x), y + 2)], fill=(150, 150, 150))
        draw.text((px(x) + 2, top + 2), label, fill=(110, 110, 110), font=font)
    for k in range(5):
        y = y1 * k / 4
        draw.line([(left - 4, py(y)), (left, py(y))], fill='black')
        draw.text((left - 6, py(y)), f'{y:.3g}', fill='black', font=font, anchor='rm')
    for x, label in xticks:
        draw.line([(px(x), bottom), (px(x), bottom + 4)], fill='black')
        draw.text((px(x), bottom + 6), str(label), fill='black', font=font, anchor='mt')
    for k, (xs, ys, label) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if len(xs) > 1:
            draw.line([(px(x), py(y)) for x, y in zip(xs, ys)], fill=colour, width=2)
        for x, y in zip(xs, ys):
            draw.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=colour)
    if len(series) > 1:         # the legend, top left, below the marks' labels
        width = max(int(font.getlength(label)) for _, _, label in series) + 44
        draw.rectangle([left + 4, top + 18, left + width, top + 24 + 16 * len(series)], fill='white',
                       outline=(150, 150, 150))
        for k, (_, _, label) in enumerate(series):
            y = top + 29 + 16 * k
            draw.line([(left + 10, y), (left + 30, y)], fill=COLOURS[k % len(COLOURS)], width=3)
            draw.text((left + 36, y), label, fill='black', font=font, anchor='lm')
    draw.text(((left + right) / 2, top - 22), title, fill='black', font=_font(14), anchor='mb')
    draw.text(((left + right) / 2, bottom + 24), xlabel, fill='black', font=font, anchor='mt')
    draw.text((left, top - 4), ylabel, fill='black', font=font, anchor='lb')


def rate_figure(res, bits, share):
    """Figure 5 (cumulative rate against layer) beside figure 4, left (cumulative share of
    latent dimensions by resolution). res, bits, share: per decoder layer, its resolution,
    its rate in bits/dim and the cumulative share of latent dimensions up to it."""
    layers = np.arange(1, len(res) + 1)
    by_res = sorted(set(res))
    res_share = [100 * share[max(i for i, r in enumerate(res) if r <= top)] for top in by_res]
    img = Image.new('RGB', (1180, 430), 'white')
    draw = ImageDraw.Draw(img)
    line_plot(draw, (90, 50, 620, 360), [(layers, np.cumsum(bits), '')], 'cumulative rate (KL) by layer',
              'decoder layer (top to bottom)', 'bits/dim', _layer_ticks(len(res)), _resolution_marks(res))
    line_plot(draw, (760, 50, 1150, 360), [(np.arange(len(by_res)), res_share, '')],
              'cumulative share of latent dimensions', 'resolution (layers up to it)', '% of dims',
              [(i, f'{r}x{r}') for i, r in enumerate(by_res)], ymax=100)
    draw.text((10, 410), f'total rate {np.sum(bits):.4f} bits/dim over {len(res)} layers',
              fill='black', font=_font())
    return np.asarray(img)


def rate_comparison(runs):
    """Figure 5's comparison: each run's cumulative rate against layer, in bits/dim and as a
    share of its own total (where in the hierarchy each model spends its rate).
    runs: [(label, resolution per layer, bits/dim per layer)]."""
    longest = max(len(res) for _, res, _ in runs)
    same = len({tuple(res) for _, res, _ in runs}) == 1
    marks = _resolution_marks(runs[0][1]) if same else []
    img = Image.new('RGB', (1180, 430), 'white')
    draw = ImageDraw.Draw(img)
    for box, title, unit, scale in (((90, 50, 620, 360), 'cumulative rate (KL) by layer', 'bits/dim', None),
                                    ((690, 50, 1150, 360), 'share of each model\'s rate', '% of rate', 100)):
        series = [(np.arange(1, len(bits) + 1), np.cumsum(bits) * (scale / np.sum(bits) if scale else 1), label)
                  for label, _, bits in runs]
        line_plot(draw, box, series, title, 'decoder layer (top to bottom)', unit, _layer_ticks(longest),
                  marks, ymax=scale)
    draw.text((10, 410), '; '.join(f'{label}: {np.sum(bits):.4f} bits/dim' for label, _, bits in runs),
              fill='black', font=_font())
    return np.asarray(img)


def _layer_ticks(n):
    return [(t, t) for t in sorted({1, n} | {int(t) for t in np.linspace(1, n, 6)})]


def _resolution_marks(res):
    """A dotted line where the decoder moves to a new resolution."""
    return [(i + 1, f'{r}x{r}') for i, r in enumerate(res) if i == 0 or r != res[i - 1]]


def training_curve(log_lines):
    """log.jsonl's lines -> two panels: training bits/dim at each log line, and validation
    bits/dim (EMA weights) at each evaluation."""
    records = [json.loads(line) for line in log_lines if line.strip()]
    img = Image.new('RGB', (1180, 430), 'white')
    draw = ImageDraw.Draw(img)
    for kind, box, title in (('train', (90, 50, 620, 360), 'training (bits/dim at each log line)'),
                             ('valid', (690, 50, 1150, 360), 'validation (EMA weights)')):
        points = [(r['step'], r['bits_per_dim']) for r in records
                  if r.get('kind') == kind and math.isfinite(r.get('bits_per_dim', math.nan))]
        if not points:
            draw.text(((box[0] + box[2]) / 2, 200), f'no {kind} values yet', fill='black', font=_font(), anchor='mm')
            continue
        steps, bits = zip(*points)
        ticks = sorted({int(t) for t in np.linspace(min(steps), max(steps), 5)})
        line_plot(draw, box, [(steps, bits, kind)], title, 'step', 'bits/dim', [(t, t) for t in ticks])
    return np.asarray(img)


def grad_norm_figure(log_lines, skip_threshold):
    """Figure 6 of the paper: the largest gradient norm of each logging interval (log scale),
    the skip threshold dashed; intervals with skipped updates in red."""
    records = [json.loads(line) for line in log_lines if line.strip()]
    points = [(r['step'], r['grad_norm_max'], r.get('skipped', 0)) for r in records
              if r.get('kind') == 'train' and r.get('grad_norm_max', 0) > 0
              and math.isfinite(r['grad_norm_max'])]
    img = Image.new('RGB', (900, 430), 'white')
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = box = (90, 50, 860, 360)
    font = _font()
    draw.text(((left + right) / 2, top - 22), 'largest gradient norm per log interval (red: updates skipped)',
              fill='black', font=_font(14), anchor='mb')
    if not points:
        draw.text(((left + right) / 2, 200), 'no gradient norms yet', fill='black', font=font, anchor='mm')
        return np.asarray(img)
    steps, norms, skipped = zip(*points)
    levels = list(norms) + ([skip_threshold] if skip_threshold > 0 else [])
    # A decade of room above the highest level, so the threshold never sits on the frame.
    lo, hi = math.floor(math.log10(min(levels))), math.floor(math.log10(max(levels))) + 1
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    py = lambda y: bottom - (math.log10(y) - lo) / (hi - lo) * (bottom - top)
    draw.rectangle(box, outline='black')
    for k in range(lo, hi + 1):
        draw.line([(left - 4, py(10. ** k)), (left, py(10. ** k))], fill='black')
        draw.text((left - 6, py(10. ** k)), f'1e{k}', fill='black', font=font, anchor='rm')
    for t in sorted({int(t) for t in np.linspace(x0, max(steps), 5)}):
        draw.line([(px(t), bottom), (px(t), bottom + 4)], fill='black')
        draw.text((px(t), bottom + 6), str(t), fill='black', font=font, anchor='mt')
    if skip_threshold > 0:
        y = py(skip_threshold)
        for x in range(left, right, 10):
            draw.line([(x, y), (min(x + 5, right), y)], fill=(200, 40, 40), width=1)
        draw.text((right - 4, y - 3), f'skip_threshold {skip_threshold:g}', fill=(200, 40, 40), font=font,
                  anchor='rb')
    else:
        draw.text((right - 4, top + 4), 'skip_threshold -1: never skips on the norm', fill=(200, 40, 40),
                  font=font, anchor='rt')
    draw.line([(px(x), py(y)) for x, y in zip(steps, norms)], fill=COLOURS[0], width=2)
    for x, y, s in zip(steps, norms, skipped):
        colour = SKIPPED_COLOUR if s else COLOURS[0]
        draw.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=colour)
    draw.text(((left + right) / 2, bottom + 24), 'step', fill='black', font=font, anchor='mt')
    draw.text((left, top - 4), 'gradient norm', fill='black', font=font, anchor='lb')
    return np.asarray(img)


SKIPPED_COLOUR = (220, 0, 0)
