"""Speed of the model on this machine: variables, time to the first train step, steady step time.

    python bench.py --presets=cifar10,imagenet32 --batch=8 --steps=3
    python bench.py --presets=cifar10 --layout=naive     # the baseline it is compared with
    python bench.py --presets=cifar10 --jit_compile      # the step as one XLA program

The train step is train.py's own (make_train_step: fwd, bwd, all-reduce, clip, skip, the
official AdamW, EMA) on random data (the model's cost does not depend on the pixels). "first step" counts the trace, graph optimisation and the first run together: it is
what a user waits for before training starts. Run nothing else while benchmarking.

    python bench.py --data --presets=cifar10 --steps=1   # input pipeline vs the model
    python bench.py --data --presets=                    # input pipeline only
    python bench.py --learn                              # learning speed against the official code
    python bench.py --compress=runs/demo                 # compress.py against the ELBO, PNG, WebP

--data first times data.train_dataset alone (shuffle, batch, preprocess; nothing consumes the
batches but the loop) on mnist5k and on 50,000 random cifar10-shaped images in a temporary
.npy, then the presets' train steps, and prints how many times faster the pipeline is.

--learn trains a small configuration (LEARN) with train.py's own loop on the mnist5k digits for
2,000 steps and prints the validation bits/dim of the raw and the EMA weights every 500 steps,
beside the official code's for the same configuration.
"""
import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags
import keras
import numpy as np
import tensorflow as tf

import data
import hparams
import model as vdvae
import train

flags.DEFINE_list('presets', ['cifar10', 'imagenet32'], 'presets to measure')
flags.DEFINE_integer('batch', 8, 'batch size')
flags.DEFINE_integer('steps', 3, 'steady-state steps to time after the first')
flags.DEFINE_boolean('grappler', None, 'Grappler graph optimisation (default: off for the '
                     'stacked layout, where it only slows the start; on for the naive one)')
flags.DEFINE_enum('layout', 'stacked', ['stacked', 'naive'],
                  "stacked: this project's model; naive: the same model with one variable per "
                  'conv kernel and bias, TF-op GELU with autodiff and no per-block functions')
flags.DEFINE_boolean('jit_compile', False, 'compile the train step as one XLA program (as a TPU does)')
flags.DEFINE_boolean('data', False, 'also time the input pipeline alone (images/s)')
flags.DEFINE_float('data_seconds', 3., 'seconds to time each input pipeline for')
flags.DEFINE_boolean('learn', False, 'instead of speed: train the learning-check configuration on '
                     'mnist5k and print validation bits/dim beside the official code\'s')
flags.DEFINE_integer('learn_steps', 2000, 'with --learn: training steps')
flags.DEFINE_integer('learn_every', 500, 'with --learn: steps between evaluations')
flags.DEFINE_integer('learn_images', 0, 'with --learn: validation digits (0: all 500)')
flags.DEFINE_string('compress', None, 'instead of speed: measure compress.py with this run folder\'s model '
                    'on its dataset\'s test images, beside PNG and WebP')
flags.DEFINE_integer('compress_images', 500, 'with --compress: test images (the marginal cost is the file of '
                     'all minus the file of the first fifth)')
FLAGS = flags.FLAGS


class PerBlockParams(vdvae.ParamStack):
    """Baseline layout: one variable per conv kernel and bias of every block, as a direct
    port of the PyTorch code would have."""

    def __init__(self, n, pieces, **kwargs):
        keras.layers.Layer.__init__(self, **kwargs)
        self.n, self.pieces = n, list(pieces)
        init = lambda b: keras.initializers.RandomUniform(-b, b) if b else 'zeros'
        self.per_block = [[self.add_weight(shape=shape, initializer=init(bound), name=f'{j}_{name.replace("/", "_")}')
                           for name, shape, bound in pieces] for j in range(n)]
        self.built = True

    def unstack(self, dtype):
        return [{name: tf.cast(v, dtype) for (name, _, _), v in zip(self.pieces, block)}
                for block in self.per_block]


def naive_bottleneck(x, weights, residual):
    h = x
    for kernel, bias in weights:
        h = vdvae.conv(tf.nn.gelu(h, approximate=False), kernel, bias)
    return x + h if residual else h


def use_naive_layout():
    vdvae.ParamStack = PerBlockParams
    vdvae.bottleneck = naive_bottleneck


def configure_tf(grappler=False):
    """Grappler spends ~15 s optimising this graph for no steady-state gain (tensorflow-notes)."""
    if not grappler:
        tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})


def bench_train_step(hp, batch, steps):
    """train.py's own step (the update rule: clip, skip, EMA, the official AdamW) on random
    data; the model's cost does not depend on the pixels."""
    strategy = tf.distribute.get_strategy()
    t0 = time.time()
    state = train.create_state(hp, strategy)
    build = time.time() - t0
    step = train.make_train_step(state, hp, strategy, jit_compile=FLAGS.jit_compile)
    shape = (batch, hp.image_size, hp.image_size, 3)
    rng = np.random.default_rng(0)
    x_in = tf.constant(rng.normal(size=shape), tf.float32)
    target = tf.constant(rng.integers(0, 256, size=shape) / 127.5 - 1., tf.float32)
    t0 = time.time()
    step.get_concrete_function(x_in, target)
    trace = time.time() - t0
    out = step(x_in, target)
    float(out['elbo'])
    first = time.time() - t0
    times = []
    for _ in range(steps):
        t0 = time.time()
        out = step(x_in, target)
        float(out['elbo'])
        times.append(time.time() - t0)
    assert np.isfinite(float(out['elbo'])), out
    model = state.model
    return dict(variables=len(model.trainable_variables), params=vdvae.count_params(model),
                build=build, trace=trace, first=first, step=float(np.median(times)),
                img_s=batch / float(np.median(times)))


def bench_data(hp, seconds):
    """Images/s data.train_dataset delivers, after a warm-up that fills the shuffle buffer."""
    batches = iter(data.train_dataset(hp))
    for _ in range(20):
        next(batches)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        x_in, target = next(batches)
        n += int(x_in.shape[0])
    return n / (time.time() - t0)


def bench_pipelines(batch, seconds):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'cifar10_shaped.npy')
        images = np.random.default_rng(0).integers(0, 256, (50_000, 32, 32, 3), np.uint8)
        np.save(path, images)
        rates = {}
        for label, hp in [('mnist5k', hparams.load('demo', batch_size=batch)),
                          ('cifar10-shaped npy', hparams.load('cifar10', dataset=f'npy:{path}',
                                                               batch_size=batch))]:
            try:
                rates[label] = bench_data(hp, seconds)
            except data.DataError as e:
                hparams.fail(e)
            print(f'input pipeline {label:<19} batch {batch:>3}: {rates[label]:>9,.0f} images/s',
                  flush=True)
    return rates


# ---------------------------------------------------------------------------------------
# --learn: does training learn at the official code's speed? The same small configuration,
# trained by train.py's own loop on the mnist5k digits, against the official code's
# validation bits/dim (measured by running the official release on CPU with this project's
# mnist5k constants; issue 13 of this project).
LEARN = dict(dataset='mnist5k', image_size=32, width=64, zdim=8, num_mixtures=5,
             enc_blocks='32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1',
             dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2', batch_size=16, lr=5e-4,
             warmup_iters=100, weight_decay=0.01, grad_clip=200., skip_threshold=400.,
             ema_rate=0.999, seed=0)
OFFICIAL_LEARN = {500: (0.726, 2.345), 1000: (0.665, 1.438), 1500: (0.574, 1.244), 2000: (0.557, 1.245)}


def learn(steps, every, n_images=None):
    """Validation bits/dim of the raw and the EMA weights every `every` steps."""
    hp = hparams.load('demo', **LEARN, steps=steps)
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(hp.seed)
    state = train.create_state(hp, strategy)
    ema_model = vdvae.VDVAE(hp)
    loop = train.make_train_loop(state, hp, strategy)
    batches = iter(data.train_dataset(hp, strategy))
    raw_eval, ema_eval = (train.make_eval_step(m, hp, strategy) for m in (state.model, ema_model))
    n = n_images or data.split_size(hp.dataset, 'valid', hp.image_size)
    print(f'learning check: width {hp.width}, zdim {hp.zdim}, batch {hp.batch_size}, lr {hp.lr}, '
          f'EMA {hp.ema_rate}, {vdvae.count_params(state.model):,} parameters; validation bits/dim '
          f'over {n} digits', flush=True)
    print(f'{"step":>5} {"raw":>7} {"EMA":>7} {"official raw":>13} {"official EMA":>13} {"skipped":>8} '
          f'{"s":>6}', flush=True)
    rows, t0, step = [], time.time(), 0
    while step < steps:
        n_steps = min(every - step % every, steps - step, 50)    # a progress line every 50 steps
        loop(batches, tf.constant(n_steps))
        step += n_steps
        hparams.progress(f'step {step}', step, steps, t0, every=30.)
        if step % every and step < steps:
            continue
        train.copy_ema(state, ema_model)
        raw, ema = (train.evaluate(e, data.eval_dataset(hp, 'valid', strategy, n_images=n))['bits_per_dim']
                    for e in (raw_eval, ema_eval))
        official = OFFICIAL_LEARN.get(step)
        rows.append(dict(step=step, raw=raw, ema=ema, official=official, skipped=int(state.skipped.numpy()),
                         seconds=time.time() - t0))
        them = f'{official[0]:>13.3f} {official[1]:>13.3f}' if official else f'{"-":>13} {"-":>13}'
        print(f'{hparams.fresh_line()}{step:>5} {raw:>7.3f} {ema:>7.3f} {them} {rows[-1]["skipped"]:>8} '
              f'{rows[-1]["seconds"]:>6.0f}', flush=True)
    print(json.dumps(dict(learn=rows)))
    return rows


def bench_compress(ckpt, n):
    """compress.py's files against the images' negative ELBO, PNG and WebP; then the cost of
    the grid (every latent coded) on a fifth of the images."""
    import io
    from PIL import Image
    import compress
    import sample
    model, hp, *_ = sample.load(ckpt)
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
        short, _ = compress.compress(model, images[:first], progress=False, **options)
        t0 = time.time()
        whole, stats = compress.compress(model, images, progress=False, **options)
        t1 = time.time()
        back = compress.decompress(model, whole, progress=False)
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
        short, _ = compress.compress(model, part[:step], grid=grid, skip_kl=0., progress=False)
        whole, _ = compress.compress(model, part, grid=grid, skip_kl=0., progress=False)
        marginal = bits(len(whole) - len(short), len(part) - step)
        rows.append(dict(label=f'grid {grid:g}', marginal=marginal, vs_elbo=marginal / part_elbo - 1))
        print(f'--grid={grid:g} --skip_kl=0: marginal {marginal:.4f} bits/dim over images {step}..{len(part)} '
              f'({100 * rows[-1]["vs_elbo"]:+.2f}% vs their ELBO)', flush=True)
    print(json.dumps(dict(compress=rows)))


def main(_):
    if FLAGS.compress:
        if FLAGS.compress_images < 2:
            hparams.fail(f'--compress_images={FLAGS.compress_images} must be at least 2')
        bench_compress(FLAGS.compress, FLAGS.compress_images)
        return
    if FLAGS.learn:
        for name, lowest in (('learn_steps', 1), ('learn_every', 1), ('learn_images', 0)):
            if FLAGS[name].value < lowest:
                hparams.fail(f'--{name}={FLAGS[name].value} must be at least {lowest}')
        learn(FLAGS.learn_steps, FLAGS.learn_every, FLAGS.learn_images)
        return
    pipeline = bench_pipelines(FLAGS.batch, FLAGS.data_seconds) if FLAGS.data else None
    grappler = FLAGS.layout == 'naive' if FLAGS.grappler is None else FLAGS.grappler
    configure_tf(grappler)
    if FLAGS.layout == 'naive':
        use_naive_layout()
    print(f'tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} cpus, '
          f'layout {FLAGS.layout}, grappler {"on" if grappler else "off"}, XLA {"on" if FLAGS.jit_compile else "off"}')
    print(f'{"preset":<11} {"batch":>5} {"vars":>5} {"params":>12} {"build s":>8} {"trace s":>8} '
          f'{"first step s":>12} {"step s":>7} {"img/s":>6}')
    for name in FLAGS.presets:
        hp = hparams.exit_on_error(hparams.load, name)
        r = bench_train_step(hp, FLAGS.batch, FLAGS.steps)
        print(f'{name:<11} {FLAGS.batch:>5} {r["variables"]:>5} {r["params"]:>12,} {r["build"]:>8.1f} '
              f'{r["trace"]:>8.1f} {r["first"]:>12.1f} {r["step"]:>7.2f} {r["img_s"]:>6.2f}', flush=True)
        if pipeline and hp.image_size == 32:
            rate = pipeline['cifar10-shaped npy']
            print(f'{"":<11} the cifar10-shaped input pipeline delivers {rate:,.0f} images/s, '
                  f'{rate / r["img_s"]:,.0f}x what this train step consumes', flush=True)


if __name__ == '__main__':
    hparams.run(main)
