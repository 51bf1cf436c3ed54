"""What bench.py does not measure, speed aside: how fast the model learns (--learn), against
the official code's figures for the same configuration, and how well compress.py compresses
(--compress), against the negative ELBO, PNG and WebP.

    python bench_quality.py --learn                  # learning speed against the official code
    python bench_quality.py --compress=runs/demo     # compress.py against the ELBO, PNG, WebP

--learn trains a small configuration (LEARN) with train.py's own loop on the mnist5k digits
for 2,000 steps and prints the validation bits/dim of the raw and the EMA weights every 500
steps, beside the official code's for the same configuration.
"""
import io
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags
import keras
import numpy as np
import tensorflow as tf
from PIL import Image

import checkpoints
import coder
import console
import data
import hparams
import model as vdvae
import steps

flags.DEFINE_boolean('learn', False, 'train the learning-check configuration on '
                     'mnist5k and print validation bits/dim beside the official code\'s')
flags.DEFINE_integer('learn_steps', 2000, 'with --learn: training steps')
flags.DEFINE_integer('learn_every', 500, 'with --learn: steps between evaluations')
flags.DEFINE_integer('learn_images', 0, 'with --learn: validation digits (0: all 500)')
flags.DEFINE_string('compress', None, 'measure compress.py with this run folder\'s model '
                    'on its dataset\'s test images, beside PNG and WebP')
flags.DEFINE_integer('compress_images', 500, 'with --compress: test images (the marginal cost is the file of '
                     'all minus the file of the first fifth)')
FLAGS = flags.FLAGS

# --learn: does training learn at the official code's speed? The same small configuration,
# trained by train.py's own loop on the mnist5k digits, against the official code's
# validation bits/dim (measured by running the official release on CPU with this project's
# mnist5k constants: docs/performance.md, "The learning check against the official code").
LEARN = dict(dataset='mnist5k', image_size=32, width=64, zdim=8, num_mixtures=5,
             enc_blocks='32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1',
             dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2', batch_size=16, lr=5e-4,
             warmup_iters=100, weight_decay=0.01, grad_clip=200., skip_threshold=400.,
             ema_rate=0.999, seed=0)
OFFICIAL_LEARN = {500: (0.726, 2.345), 1000: (0.665, 1.438), 1500: (0.574, 1.244), 2000: (0.557, 1.245)}


def learn(total_steps, every, n_images=None):
    """Validation bits/dim of the raw and the EMA weights every `every` steps."""
    hp = hparams.load('demo', **LEARN, steps=total_steps)
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(hp.seed)
    state = steps.create_state(hp, strategy)
    ema_model = vdvae.VDVAE(hp)
    loop = steps.make_train_loop(state, hp, strategy)
    batches = iter(data.train_dataset(hp, strategy))
    raw_eval, ema_eval = (steps.make_eval_step(m, hp, strategy) for m in (state.model, ema_model))
    n = n_images or data.split_size(hp.dataset, 'valid', hp.image_size)
    print(f'learning check: width {hp.width}, zdim {hp.zdim}, batch {hp.batch_size}, lr {hp.lr}, '
          f'EMA {hp.ema_rate}, {vdvae.count_params(state.model):,} parameters; validation bits/dim '
          f'over {n} digits', flush=True)
    print(f'{"step":>5} {"raw":>7} {"EMA":>7} {"official raw":>13} {"official EMA":>13} {"skipped":>8} '
          f'{"s":>6}', flush=True)
    rows, t0, step = [], time.time(), 0
    while step < total_steps:
        n_steps = min(every - step % every, total_steps - step, 50)    # a progress line every 50 steps
        loop(batches, tf.constant(n_steps))
        step += n_steps
        console.progress(f'step {step}', step, total_steps, t0, every=30.)
        if step % every and step < total_steps:
            continue
        steps.copy_ema(state, ema_model)
        raw, ema = (steps.evaluate(e, data.eval_dataset(hp, 'valid', strategy, n_images=n))['bits_per_dim']
                    for e in (raw_eval, ema_eval))
        official = OFFICIAL_LEARN.get(step)
        rows.append(dict(step=step, raw=raw, ema=ema, official=official, skipped=int(state.skipped.numpy()),
                         seconds=time.time() - t0))
        them = f'{official[0]:>13.3f} {official[1]:>13.3f}' if official else f'{"-":>13} {"-":>13}'
        print(f'{console.fresh_line()}{step:>5} {raw:>7.3f} {ema:>7.3f} {them} {rows[-1]["skipped"]:>8} '
              f'{rows[-1]["seconds"]:>6.0f}', flush=True)
    print(json.dumps(dict(learn=rows)))
    return rows


def compression(ckpt, n):
    """compress.py's files against the images' negative ELBO, PNG and WebP; then the cost of
    the grid (every latent coded) on a fifth of the images."""
    model, hp, *_ = checkpoints.load(ckpt)
    images = np.stack(list(data.load_split(hp.dataset, 'test', hp.image_size).take(n).as_numpy_iterator()))
    first, dims = max(1, len(images) // 5), images[0].size
    bits = lambda size, count: 8 * size / (count * dims)

    def elbo(x):
        x_in, target = data.preprocess(x, hp)
        return np.mean([np.concatenate([model.losses_per_image(x_in[i:i + 100], target[i:i + 100], seed=[s, i])[
            'elbo'].numpy() for i in range(0, len(x), 100)]).mean() for s in range(4)]) / np.log(2)

    rest_elbo = elbo(images[first:])
    print(f'{len(images)} {hp.dataset} test images, {images.nbytes:,} bytes raw; negative ELBO '
          f'{elbo(images):.4f} bits/dim over all, {rest_elbo:.4f} over the {len(images) - first} after the '
          f'first {first} (4 draws each)', flush=True)
    for name, fmt, options in (('PNG (optimize)', 'PNG', dict(optimize=True)),
                               ('WebP lossless', 'WEBP', dict(lossless=True, quality=100, method=6))):
        size = 0
        for x in images:
            buffer = io.BytesIO()
            Image.fromarray(x).save(buffer, format=fmt, **options)
            size += len(buffer.getvalue())
        print(f'{name:<34} {bits(size, len(images)):.4f} bits/dim ({size:,} bytes)', flush=True)
    rows = []
    for label, options in (('defaults', {}), ('every latent (--skip_kl=0)', dict(skip_kl=0.))):
        short, _ = coder.compress(model, images[:first], progress=False, **options)
        t0 = time.time()
        whole, stats = coder.compress(model, images, progress=False, **options)
        t1 = time.time()
        back = coder.decompress(model, whole, progress=False)
        t2 = time.time()
        assert np.array_equal(back, images), 'not lossless'
        marginal = bits(len(whole) - len(short), len(images) - first)
        per_image = 8 * (len(whole) - len(short)) / (len(images) - first)
        rows.append(dict(label=label, file=bits(len(whole), len(images)), bytes=len(whole), marginal=marginal,
                         vs_elbo=marginal / rest_elbo - 1, initial_bits=stats['initial_bits'],
                         initial_images=stats['initial_bits'] / per_image, coded=stats['coded_channels'],
                         compress_img_s=len(images) / (t1 - t0), decompress_img_s=len(images) / (t2 - t1)))
        r = rows[-1]
        print(f'compress.py, {label:<22} {r["file"]:.4f} bits/dim ({r["bytes"]:,} bytes); marginal {marginal:.4f} '
              f'({100 * r["vs_elbo"]:+.2f}% vs ELBO); start-up {r["initial_bits"]:,} bits ({r["initial_images"]:.1f} '
              f'images); {r["coded"]} latent channels coded; {r["compress_img_s"]:.1f} / {r["decompress_img_s"]:.1f} '
              'images/s compressing / decompressing; lossless', flush=True)
    part, step = images[:2 * first], max(1, first // 2)
    part_elbo = elbo(part[step:])
    for grid in (1., 2., 4., 8.):       # every latent coded: the grid's own cost
        short, _ = coder.compress(model, part[:step], grid=grid, skip_kl=0., progress=False)
        whole, _ = coder.compress(model, part, grid=grid, skip_kl=0., progress=False)
        marginal = bits(len(whole) - len(short), len(part) - step)
        rows.append(dict(label=f'grid {grid:g}', marginal=marginal, vs_elbo=marginal / part_elbo - 1))
        print(f'--grid={grid:g} --skip_kl=0: marginal {marginal:.4f} bits/dim over images {step}..{len(part)} '
              f'({100 * rows[-1]["vs_elbo"]:+.2f}% vs their ELBO)', flush=True)
    print(json.dumps(dict(compress=rows)))


def main(_):
    if bool(FLAGS.learn) == bool(FLAGS.compress):
        console.fail('give --learn (learning speed) or --compress=RUN (compression), one of them')
    if FLAGS.compress:
        console.at_least(compress_images=2)
        compression(FLAGS.compress, FLAGS.compress_images)
    else:
        console.at_least(learn_steps=1, learn_every=1, learn_images=0)
        learn(FLAGS.learn_steps, FLAGS.learn_every, FLAGS.learn_images)


if __name__ == '__main__':
    console.run(main)
