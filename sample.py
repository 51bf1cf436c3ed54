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
import math
import os
import re
import shutil
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

import checkpoints
import data
from figures import grid, labelled, rate_comparison, rate_figure, titled, write_png
import hparams

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
    """The command line; defined only when sample.py is the program (train.py imports it)."""
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
# Temperatures.


def parse_temperatures(spec, model):
    """--temp text -> [(label, float or (num_layers,) float32 array)], one per grid row."""
    rows = spec.split(';') if ';' in spec or ':' in spec else spec.split(',')
    return [(row.strip(), _schedule(row.strip(), model)) for row in rows]


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'--temp: {text!r} is not a number') from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f'--temp: {text} must be a finite number >= 0')
    return value


def _schedule(row, model):
    kind, _, rest = row.partition(':')
    resolutions = np.array([b.res for b in model.decoder.blocks])
    if not rest:
        return _number(kind)
    if kind == 'ramp':
        ends = rest.split(':')
        if len(ends) != 2:
            raise ValueError(f'--temp: {row!r}; a ramp is ramp:FIRST:LAST')
        return np.linspace(_number(ends[0]), _number(ends[1]), model.num_layers).astype(np.float32)
    if kind == 'layers':
        values = [_number(v) for v in rest.split(',')]
        model.temperatures(values)       # the one place that checks the length
        return np.array(values, np.float32)
    if kind == 'res':
        out = np.ones(model.num_layers, np.float32)
        for item in rest.split(','):
            res, eq, value = item.partition('=')
            if not eq or not res.strip().isdigit() or int(res) not in resolutions:
                raise ValueError(f'--temp: {item!r} must be RES=VALUE with RES one of the '
                                 f'decoder\'s resolutions {sorted(set(resolutions.tolist()))}')
            out[resolutions == int(res)] = _number(value)
        return out
    raise ValueError(f'--temp: unknown form {kind!r}; see --help (ramp:, res:, layers:)')


# ---------------------------------------------------------------------------------------
# The figures' computations.


def make_sampler(model, jit_compile=False, pixels='sample'):
    """(n, temperature, seed) -> uint8 images. The prior path only, one compiled graph per
    batch size; temperatures are a tensor, so every schedule reuses the graph. jit_compile:
    one XLA program per batch size (as on a TPU). pixels: 'sample' or 'mode' (model.sample)."""
    graph = tf.function(lambda n, temperatures, seed: model.sample(n, temperatures, seed, pixels),
                        autograph=False, reduce_retracing=False, jit_compile=jit_compile or None)

    def sample(n, temperature, seed):
        return graph(n, model.temperatures(temperature), tf.constant(seed, tf.int32))
    sample.graph = graph
    return sample


def generate(sampler, n, temperature, seed, batch, timings=None):
    """n images in batches; batch i uses seed (seed, i), so the same seed gives the same images."""
    out, start_time = [], time.time()
    for i, start in enumerate(range(0, n, batch)):
        t0 = time.time()
        out.append(sampler(min(batch, n - start), temperature, [seed, i]).numpy())
        if timings is not None:
            timings.append((len(out[-1]), time.time() - t0))
        if n > batch:
            hparams.progress('sampling', start + len(out[-1]), n, start_time, every=30.)
    return np.concatenate(out)


def latent_share(model):
    """Cumulative share of the latent dimensions held by the first k layers, k = 1..L."""
    dims = np.array([b.res ** 2 * model.hp.zdim for b in model.decoder.blocks], np.float64)
    return np.cumsum(dims) / dims.sum()


def default_keep(model):
    L = model.num_layers
    return sorted({max(1, L * f // 8) for f in (0, 1, 2, 4, 6, 8)})


def reconstructions(model, x_in, keep, temperature=0.1, seed=0, pixels='sample'):
    """For each k in `keep`: images decoded from the first k posterior latents of x_in, the
    remaining layers drawn from the prior at `temperature`."""
    latents = model.posterior_latents(x_in, seed=[seed, 0])
    return [model.decode_images(latents[:k], temperature=temperature, seed=[seed, k], pixels=pixels).numpy()
            for k in keep]


def rate_per_layer(model, x_in, batch, seed=0):
    """(num_layers,) average KL of each decoder layer in bits/dim over the images x_in."""
    graph = tf.function(lambda x, s: model.rate_per_layer(x, seed=s), autograph=False)
    rates, t0 = [], time.time()
    for i in range(0, len(x_in), batch):
        rates.append(graph(x_in[i:i + batch], tf.constant([seed, i], tf.int32)).numpy())
        if len(x_in) > batch:
            hparams.progress('rate per layer', i + len(rates[-1]), len(x_in), t0, every=30.)
    return np.concatenate(rates).mean(0) / math.log(2)


def sample_grid(model, x_in, target, temperatures=(1.0, 0.9, 0.8), seed=0, title=None):
    """The training preview. Rows: data; reconstructions from the first 1, L/4, L/2 and L
    posterior latents (the rest at temperature 0.1), then the last of them with the most likely
    pixels ('mode'); samples at each temperature, each followed by the same latents' mode
    row. Sampled pixels are what the likelihood scores, mode rows what a reader recognises
    early in training, when each pixel's distribution is still broad. `title`: a line above it."""
    L = model.num_layers
    keep = sorted({1, L // 4, L // 2, L} - {0})
    # The data row rounds: to_uint8 truncates like the official sampler, which would turn
    # 66 / 127.5 - 1 back into 65.
    data_row = np.round((np.asarray(target) + 1.) * 127.5).astype(np.uint8)
    share = latent_share(model)
    rows = [data_row] + reconstructions(model, x_in, keep, 0.1, seed)
    rows += reconstructions(model, x_in, [L], 0.1, seed, pixels='mode')
    labels = ['data'] + [f'k={k} ({100 * share[k - 1]:.3g}%)' for k in keep] + [f'k={L}, mode']
    for i, t in enumerate(temperatures):
        rows += [model.sample(len(x_in), t, [seed, 1000 + i], pixels).numpy() for pixels in ('sample', 'mode')]
        labels += [f't={t}', f't={t}, mode']
    size = model.hp.image_size
    image = labelled(grid(np.stack(rows)), left=labels, cell=(size, size), scale=max(1, 64 // size))
    return titled(image, f'{title}; "mode" rows: most likely pixels, the others sampled') if title else image


# ---------------------------------------------------------------------------------------
# The command line.


def read_images(spec, hp, n, data_dir=None):
    """uint8 (m, S, S, 3): --images (a file, a folder or a .npy), else n validation images
    spread over the split (splits may be sorted, e.g. by label)."""
    size = hp.image_size
    if spec is None:
        total = data.split_size(hp.dataset, 'valid', size, data_dir)
        split = data.load_split(hp.dataset, 'valid', size, data_dir)
        return np.stack(list(split.shard(max(total // n, 1), 0).take(n).as_numpy_iterator()))
    if not os.path.exists(spec):
        hparams.fail(f'--images={spec}: no such file or folder')
    if spec.endswith('.npy'):
        images = np.load(spec, mmap_mode='r')[:n]
        names = [spec] * len(images)
    else:
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if f.lower().endswith(('.png', '.jpg', '.jpeg', '.bmp', '.webp'))) \
            if os.path.isdir(spec) else [spec]
        if not paths:
            hparams.fail(f'--images={spec}: no .png/.jpg/.bmp/.webp images in the folder')
        images, names = [], paths[:n]
        for p in names:
            try:
                images.append(np.asarray(Image.open(p).convert('RGB')))
            except OSError as e:
                hparams.fail(f'{p}: not a readable image ({e})')
    for image, name in zip(images, names):
        if image.shape != (size, size, 3):
            hparams.fail(f'{name}: image of shape {image.shape}; this model takes {size}x{size} '
                         f'RGB images ({size}, {size}, 3)')
    return np.asarray(images, np.uint8)


def output_path(folder, name, also=()):
    """--out or the default in <run>/figures/; `also`: suffixes of files written beside it,
    which must not be overwritten silently either."""
    path = FLAGS.out or os.path.join(folder, 'figures', name)
    for p in [path] + [os.path.splitext(path)[0] + suffix for suffix in also]:
        if os.path.exists(p) and not FLAGS.overwrite:
            hparams.fail(f'{p} exists; pass --overwrite or another --out')
    return path


def temperatures_or_fail(default, model):
    try:
        return parse_temperatures(FLAGS.temp or default, model)
    except ValueError as e:
        hparams.fail(e)


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
    name = re.sub(r'[^0-9a-z.=_-]+', '_', (FLAGS.temp or '1.0').lower())
    mode = '-mode' if FLAGS.pixels == 'mode' else ''
    path = output_path(folder, f'samples-t{name}-seed{FLAGS.seed}{mode}.png')
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
        hparams.fail(f'--temp={FLAGS.temp}: --mode=export takes one temperature (or one schedule)')
    tag = re.sub(r'[^0-9a-z.=_-]+', '_', (FLAGS.temp or '1.0').lower())
    path = FLAGS.out or os.path.join(folder, 'figures', f'export-t{tag}-seed{FLAGS.seed}-n{FLAGS.n}'
                                     + ('-mode' if FLAGS.pixels == 'mode' else ''))
    if os.path.exists(path):
        hparams.fail(f'{path} exists; --mode=export never writes into an existing file or folder '
                     '(remove it or give another --out)')
    parent = os.path.dirname(os.path.normpath(path)) or '.'
    while not os.path.exists(parent):          # the nearest folder that exists must take files
        parent = os.path.dirname(parent) or '.'
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        # Before the sampling, which may take hours, not after it.
        hparams.fail(f'{path}: cannot write there ({parent} is {"not a folder" if not os.path.isdir(parent) else "not writable"})')
    sampler, timings = make_sampler(model, pixels=FLAGS.pixels), []
    images = generate(sampler, FLAGS.n, rows[0][1], FLAGS.seed, FLAGS.batch, timings)
    with checkpoints.writing(path, 'the samples', '; nothing was written'):
        if path.endswith('.npz'):
            buffer = io.BytesIO()
            np.savez(buffer, samples=images)
            checkpoints.write_whole(path, buffer.getvalue())
        else:
            part = path.rstrip('/') + '.part'
            shutil.rmtree(part, ignore_errors=True)         # an earlier export that was cut off
            try:
                os.makedirs(part)
                for i, image in enumerate(images):
                    Image.fromarray(image).save(os.path.join(part, f'{i:06d}.png'))
                os.rename(part, path)
            except BaseException:
                shutil.rmtree(part, ignore_errors=True)
                raise
    rate = sum(n for n, _ in timings) / sum(t for _, t in timings)
    print(f'{len(images)} samples ({hp.image_size}x{hp.image_size}, t={rows[0][0]}, pixels {FLAGS.pixels}, '
          f'seed {FLAGS.seed}) at {rate:.1f} images/s; wrote {path}')


def reconstruct_mode(model, hp, folder):
    try:
        keep = ([int(k) for k in FLAGS.keep.split(',')] if FLAGS.keep else default_keep(model))
    except ValueError:
        hparams.fail(f'--keep={FLAGS.keep}: give a comma list of whole numbers')
    if not all(1 <= k <= model.num_layers for k in keep):
        hparams.fail(f'--keep={FLAGS.keep}: every k must lie in 1..{model.num_layers} (the decoder\'s layers)')
    temperature = temperatures_or_fail('0.1', model)[0][1]
    images = read_images(FLAGS.images, hp, FLAGS.n, FLAGS.data_dir)
    x_in, target = data.preprocess(images, hp)
    parts = [reconstructions(model, x_in[s:s + FLAGS.batch], keep, temperature, FLAGS.seed + s, FLAGS.pixels)
             for s in range(0, len(images), FLAGS.batch)]
    columns = [images] + [np.concatenate([p[j] for p in parts]) for j in range(len(keep))]
    share = latent_share(model)
    top = ['data'] + [f'k={k}\n{100 * share[k - 1]:.3g}%' for k in keep]
    picture = labelled(grid(np.stack(columns, 1)), top=top, cell=images.shape[1:3],
                       scale=max(1, 64 // hp.image_size))
    path = output_path(folder, f'reconstructions-seed{FLAGS.seed}{"-mode" if FLAGS.pixels == "mode" else ""}.png')
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
            hparams.fail(f'--mode=stats compares runs on the same data: {folder} is {other.dataset} '
                         f'{other.image_size}x{other.image_size}, {runs[0][2]} is {hp.dataset} '
                         f'{hp.image_size}x{hp.image_size}')
    images = read_images(FLAGS.images, hp, FLAGS.n, FLAGS.data_dir)
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
    with checkpoints.writing(csv_path, 'the table', '; nothing was written'):
        checkpoints.write_whole(csv_path, text.getvalue())
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
        hparams.fail('--ckpt is required: a run folder or a ckpt-N prefix')
    hparams.at_least(n=1, nrow=1, batch=1)
    unused = [name for name, modes in [('keep', ['reconstruct']), ('images', ['reconstruct', 'stats']),
                                       ('temp', ['sample', 'reconstruct', 'export']),
                                       ('data_dir', ['reconstruct', 'stats'])]
              if FLAGS[name].value is not None and FLAGS.mode not in modes]
    if unused:
        hparams.fail(f'--{unused[0]} means nothing with --mode={FLAGS.mode}')
    if FLAGS.pixels != 'sample' and FLAGS.mode == 'stats':
        hparams.fail('--pixels means nothing with --mode=stats (it measures the rate, not pixels)')
    if FLAGS.mode == 'export' and FLAGS.overwrite:
        hparams.fail('--overwrite: --mode=export never replaces samples; remove the old ones or give another --out')
    ckpts = [c for c in FLAGS.ckpt.split(',') if c]
    if not ckpts:
        hparams.fail(f'--ckpt={FLAGS.ckpt} names no run folder or ckpt-N prefix')
    if len(ckpts) > 1 and FLAGS.mode != 'stats':
        hparams.fail(f'--ckpt names {len(ckpts)} checkpoints; only --mode=stats compares several')
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
    except data.DataError as e:
        hparams.fail(e)


if __name__ == '__main__':
    define_flags()
    hparams.run(main)
