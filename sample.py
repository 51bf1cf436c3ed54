"""Look at a trained VDVAE: samples at a temperature, reconstructions from the first k
posterior latents, and where in the hierarchy the rate is spent.

    python sample.py --ckpt=runs/imagenet32 --temp=0.85
    python sample.py --ckpt=runs/imagenet32 --temp=1.0,0.9,0.8,0.7 --n=8   # a row per temperature
    python sample.py --ckpt=runs/imagenet32 --mode=reconstruct [--images=FILE_OR_FOLDER]
    python sample.py --ckpt=runs/imagenet32 --mode=stats
    python sample.py --ckpt=runs/nearest,runs/learned,runs/ffn --mode=stats   # figure 5's comparison
    python sample.py --ckpt=runs/imagenet32 --mode=export --n=50000 --out=samples.npz   # for FID

The EMA weights and the hyperparameters come from the run folder (hparams.json); --ckpt is
the folder (its latest checkpoint) or one ckpt-N prefix inside it.
"""
import csv
import io
import os
import re

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

import checkpoints
import data
import errors
import files
from figures import grid, labelled, rate_comparison, rate_figure, write_png
import console
from sampling import (default_keep, generate, latent_share, make_sampler, parse_temperatures, rate_per_layer,
                      reconstructions)

FLAGS = flags.FLAGS

TEMPERATURE_HELP = """temperature of the prior's noise. Forms:
  0.85                one temperature for every layer;
  1.0,0.9,0.8         one grid row per temperature;
  ramp:0.6:1.0        a linear ramp from the first (top) layer to the last;
  res:1=0.6,4=0.8     a value per resolution (unlisted resolutions: 1.0);
  layers:0.9,0.9,...  one value per decoder layer (exactly as many as layers);
  A;B                 rows of any of these forms, e.g. 'ramp:0.6:1.0;0.85'.
Default 1.0 for samples, 0.1 for the layers a reconstruction leaves to the prior."""


def define_flags():
    """The command line; defined only when sample.py is the program (tests import it)."""
    flags.DEFINE_string('ckpt', None, 'run folder or ckpt-N prefix (required); --mode=stats takes '
                        'several, comma-separated, and compares them in one figure')
    flags.DEFINE_enum('mode', 'sample', ['sample', 'reconstruct', 'stats', 'export'],
                      'sample: unconditional samples; reconstruct: keep the first k posterior '
                      'latents (figure 4); stats: per-layer rate, CSV and plot (figure 5); export: '
                      '--n samples at one --temp for an external metric (FID, precision/recall), '
                      'one PNG each in the folder --out, or one uint8 (N, H, W, 3) array if --out '
                      'ends in .npz')
    flags.DEFINE_enum('pixels', 'sample', ['sample', 'mode'],
                      'sample: pixels drawn from p(x | z), as in the paper\'s figures; mode: each '
                      'pixel\'s most likely value (its most probable mixture component\'s mean): '
                      'the image the decoder has in mind, without the per-pixel noise that is '
                      'broad early in training')
    flags.DEFINE_string('temp', None, TEMPERATURE_HELP)
    flags.DEFINE_integer('n', 16, 'samples per temperature; images to reconstruct or to average stats over')
    flags.DEFINE_integer('nrow', 8, 'images per grid row (sample mode)')
    flags.DEFINE_integer('seed', 0, 'same seed, same images')
    flags.DEFINE_integer('batch', 16, 'images per compiled batch')
    flags.DEFINE_string('keep', None, 'reconstruct: comma list of k, the posterior latent layers '
                        'kept (default: 1, L/8, L/4, L/2, 3L/4, L)')
    flags.DEFINE_string('images', None, 'reconstruct / stats: an image file, a folder of images or '
                        'a .npy (N, H, W, 3) uint8; default: the dataset\'s validation images')
    flags.DEFINE_string('data_dir', None, 'tfds data_dir or dataset folder, for validation images')
    flags.DEFINE_string('hparams', None, 'optional check: the preset the checkpoint must have been trained with')
    flags.DEFINE_string('out', None, 'output PNG (stats: also a .csv beside it; export: a folder, or '
                        'a .npz); default in <run folder>/figures/')
    flags.DEFINE_boolean('overwrite', False, 'replace an existing --out')


# ---------------------------------------------------------------------------------------
# The command line.


def output_path(folder, name, also=()):
    """--out or the default in <run>/figures/; `also`: suffixes of files written beside it,
    which must not be overwritten silently either."""
    path = FLAGS.out or os.path.join(folder, 'figures', name)
    for p in [path] + [os.path.splitext(path)[0] + suffix for suffix in also]:
        if os.path.exists(p) and not FLAGS.overwrite:
            console.fail(f'{p} exists; pass --overwrite or another --out')
    return path


def _temp_tag():
    """--temp as part of a file name."""
    return re.sub(r'[^0-9a-z.=_-]+', '_', (FLAGS.temp or '1.0').lower())


def _pixels_tag():
    return '-mode' if FLAGS.pixels == 'mode' else ''


def temperatures_or_fail(default, model):
    try:
        return parse_temperatures(FLAGS.temp or default, model)
    except ValueError as e:
        console.fail(e)


def sample_mode(model, hp, folder):
    rows = temperatures_or_fail('1.0', model)
    sampler, timings, images = make_sampler(model, pixels=FLAGS.pixels), [], []
    for i, (_, temperature) in enumerate(rows):
        images.append(generate(sampler, FLAGS.n, temperature, FLAGS.seed + 7919 * i, FLAGS.batch, timings))
    per_row = min(FLAGS.nrow, FLAGS.n)
    cells, labels = [], []
    for (label, _), imgs in zip(rows, images):
        pad = -len(imgs) % per_row
        imgs = np.concatenate([imgs, np.full((pad,) + imgs.shape[1:], 255, np.uint8)])
        cells += list(imgs.reshape(-1, per_row, *imgs.shape[1:]))
        labels += [f't={label}'] + [''] * (len(imgs) // per_row - 1)
    picture = grid(np.stack(cells))
    if len(rows) > 1 or ':' in rows[0][0]:
        picture = labelled(picture, left=labels, cell=images[0].shape[1:3], scale=max(1, 64 // hp.image_size))
    path = output_path(folder, f'samples-t{_temp_tag()}-seed{FLAGS.seed}{_pixels_tag()}.png')
    write_png(picture, path)
    steady = timings[1:] or timings          # the first batch also traces the graph
    rate = sum(n for n, _ in steady) / sum(t for _, t in steady)
    print(f'{FLAGS.n * len(rows)} samples in {sum(t for _, t in timings):.1f} s: {rate:.1f} images/s'
          f'{"" if len(timings) > 1 else " (including tracing)"}, first batch {timings[0][1]:.1f} s; '
          f'wrote {path}')


def export_mode(model, hp, folder):
    """--n samples at one temperature, as files an FID or precision/recall tool reads: a folder
    of PNGs (000000.png, ...) or one .npz holding `samples`, uint8 (N, H, W, 3). Written
    under a temporary name and renamed at the end, so an interrupted export leaves no
    half-filled output that a metric would read as complete."""
    rows = temperatures_or_fail('1.0', model)
    if len(rows) > 1:
        console.fail(f'--temp={FLAGS.temp}: --mode=export takes one temperature (or one schedule)')
    path = FLAGS.out or os.path.join(folder, 'figures', f'export-t{_temp_tag()}-seed{FLAGS.seed}-n{FLAGS.n}{_pixels_tag()}')
    if os.path.exists(path):
        console.fail(f'{path} exists; --mode=export never writes into an existing file or folder '
                     '(remove it or give another --out)')
    parent = os.path.dirname(os.path.normpath(path)) or '.'
    while not os.path.exists(parent):          # the nearest folder that exists must take files
        parent = os.path.dirname(parent) or '.'
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        # Before the sampling, which may take hours, not after it.
        console.fail(f'{path}: cannot write there ({parent} is {"not a folder" if not os.path.isdir(parent) else "not writable"})')
    sampler, timings = make_sampler(model, pixels=FLAGS.pixels), []
    images = generate(sampler, FLAGS.n, rows[0][1], FLAGS.seed, FLAGS.batch, timings)
    with files.writing(path, 'the samples', '; nothing was written'):
        if path.endswith('.npz'):
            buffer = io.BytesIO()
            np.savez(buffer, samples=images)
            files.write_whole(path, buffer.getvalue())
        else:
            with files.replacing(path, '.part') as part:
                os.makedirs(part)
                for i, image in enumerate(images):
                    Image.fromarray(image).save(os.path.join(part, f'{i:06d}.png'))
    rate = sum(n for n, _ in timings) / sum(t for _, t in timings)
    print(f'{len(images)} samples ({hp.image_size}x{hp.image_size}, t={rows[0][0]}, pixels {FLAGS.pixels}, '
          f'seed {FLAGS.seed}) at {rate:.1f} images/s; wrote {path}')


def reconstruct_mode(model, hp, folder):
    try:
        keep = ([int(k) for k in FLAGS.keep.split(',')] if FLAGS.keep else default_keep(model))
    except ValueError:
        console.fail(f'--keep={FLAGS.keep}: give a comma list of whole numbers')
    if not all(1 <= k <= model.num_layers for k in keep):
        console.fail(f'--keep={FLAGS.keep}: every k must lie in 1..{model.num_layers} (the decoder\'s layers)')
    temperature = temperatures_or_fail('0.1', model)[0][1]
    images = data.read_images(FLAGS.images, hp, FLAGS.n, FLAGS.data_dir)
    x_in, target = data.preprocess(images, hp)
    parts = [reconstructions(model, x_in[s:s + FLAGS.batch], keep, temperature, FLAGS.seed + s, FLAGS.pixels)
             for s in range(0, len(images), FLAGS.batch)]
    columns = [images] + [np.concatenate([p[j] for p in parts]) for j in range(len(keep))]
    share = latent_share(model)
    top = ['data'] + [f'k={k}\n{100 * share[k - 1]:.3g}%' for k in keep]
    picture = labelled(grid(np.stack(columns, 1)), top=top, cell=images.shape[1:3],
                       scale=max(1, 64 // hp.image_size))
    path = output_path(folder, f'reconstructions-seed{FLAGS.seed}{_pixels_tag()}.png')
    write_png(picture, path)
    for k in keep:
        print(f'k={k:4d}: first {k} of {model.num_layers} layers, {100 * share[k - 1]:.2f}% of the latent dimensions')
    print(f'wrote {path}: {len(images)} images; columns: data, then k = {", ".join(map(str, keep))}')


def stats_mode(runs):
    """runs: [(model, hp, folder)]; several are compared in one figure (the first run's
    folder gets it)."""
    hp = runs[0][1]
    for _, other, folder in runs[1:]:
        if (other.dataset, other.image_size, other.low_bit) != (hp.dataset, hp.image_size, hp.low_bit):
            console.fail(f'--mode=stats compares runs on the same data: {folder} is {other.dataset} '
                         f'{other.image_size}x{other.image_size}, {runs[0][2]} is {hp.dataset} '
                         f'{hp.image_size}x{hp.image_size}')
    images = data.read_images(FLAGS.images, hp, FLAGS.n, FLAGS.data_dir)
    x_in = data.preprocess(images, hp)[0]
    labels = _labels([folder for _, _, folder in runs])
    results = [(label, model, rate_per_layer(model, x_in, FLAGS.batch, FLAGS.seed))
               for label, (model, _, _) in zip(labels, runs)]
    path = output_path(runs[0][2], 'stats.png' if len(runs) == 1 else 'stats-compare.png', also=['.csv'])
    csv_path = os.path.splitext(path)[0] + '.csv'
    rows = [['run', 'layer', 'resolution', 'latent_dims', 'kl_bits_per_dim', 'cumulative_bits_per_dim',
             'cumulative_latent_share']]
    for (_, model, bits), (_, _, folder) in zip(results, runs):
        share, cumulative = latent_share(model), np.cumsum(bits)
        rows += [[folder, i + 1, b.res, b.res ** 2 * model.hp.zdim, f'{bits[i]:.8g}', f'{cumulative[i]:.8g}',
                  f'{share[i]:.6f}'] for i, b in enumerate(model.decoder.blocks)]
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    with files.writing(csv_path, 'the table', '; nothing was written'):
        files.write_whole(csv_path, text.getvalue())
    if len(runs) == 1:
        picture = rate_figure([b.res for b in results[0][1].decoder.blocks], results[0][2], latent_share(results[0][1]))
    else:
        picture = rate_comparison([(label, [b.res for b in m.decoder.blocks], bits) for label, m, bits in results])
    write_png(picture, path)
    for label, model, bits in results:
        top = np.argsort(bits)[::-1][:3]
        half = int(np.searchsorted(np.cumsum(bits), bits.sum() / 2)) + 1
        print(f'{label}: rate {bits.sum():.4f} bits/dim over {len(images)} images; half of it by layer '
              f'{half} of {len(bits)}; largest layers: '
              + ', '.join(f'{i + 1} ({model.decoder.blocks[i].res}x{model.decoder.blocks[i].res}, '
                          f'{bits[i]:.4f})' for i in top))
    print(f'wrote {csv_path} and {path}')


def _labels(folders):
    """The run folders' own names, or their paths where two names are the same."""
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    return names if len(set(names)) == len(names) else [os.path.normpath(f) for f in folders]


def main(_):
    tf.get_logger().setLevel('ERROR')
    if not FLAGS.ckpt:
        console.fail('--ckpt is required: a run folder or a ckpt-N prefix')
    console.at_least(n=1, nrow=1, batch=1)
    unused = [name for name, modes in [('keep', ['reconstruct']), ('images', ['reconstruct', 'stats']),
                                       ('temp', ['sample', 'reconstruct', 'export']),
                                       ('data_dir', ['reconstruct', 'stats'])]
              if FLAGS[name].value is not None and FLAGS.mode not in modes]
    if unused:
        console.fail(f'--{unused[0]} means nothing with --mode={FLAGS.mode}')
    if FLAGS.pixels != 'sample' and FLAGS.mode == 'stats':
        console.fail('--pixels means nothing with --mode=stats (it measures the rate, not pixels)')
    if FLAGS.mode == 'export' and FLAGS.overwrite:
        console.fail('--overwrite: --mode=export never replaces samples; remove the old ones or give another --out')
    ckpts = [c for c in FLAGS.ckpt.split(',') if c]
    if not ckpts:
        console.fail(f'--ckpt={FLAGS.ckpt} names no run folder or ckpt-N prefix')
    if len(ckpts) > 1 and FLAGS.mode != 'stats':
        console.fail(f'--ckpt names {len(ckpts)} checkpoints; only --mode=stats compares several')
    runs = []
    for ckpt in ckpts:
        model, hp, folder, path, step = checkpoints.load(ckpt)
        if FLAGS.hparams:
            checkpoints.check_preset(hp, FLAGS.hparams)
        print(f'{path}: {hp.dataset} {hp.image_size}x{hp.image_size}, {model.num_layers} layers, '
              f'EMA weights at step {step}')
        runs.append((model, hp, folder))
    try:
        if FLAGS.mode == 'stats':
            stats_mode(runs)
        else:
            dict(sample=sample_mode, reconstruct=reconstruct_mode, export=export_mode)[FLAGS.mode](*runs[0])
    except errors.DataError as e:
        console.fail(e)


if __name__ == '__main__':
    define_flags()
    console.run(main)
