"""Speed and memory of the model on this machine, per preset: train.py's train step, its
evaluation step and sample.py's sampler, against this machine's bare-convolution GFLOP/s.

    python bench.py --presets=cifar10,imagenet32 --batch=8 --steps=3
    python bench.py --presets=cifar10 --precision=mixed_bfloat16
    python bench.py --presets=imagenet64 --batch=4 --paths=train --remat   # memory for compute
    python bench.py --presets=cifar10 --layout=naive     # the baseline it is compared with
    python bench.py --presets=cifar10 --xla              # each path as one XLA program
    python bench.py --presets=cifar10 --profile=prof     # where each path's op time goes

The train step is train.py's own (make_train_step: fwd, bwd, all-reduce, clip, skip, the
official AdamW, EMA), on random data (the model's cost does not depend on the pixels).
"first s" counts the trace, graph optimisation and the first run together: what a user
waits for before training starts. Peak memory is the process's high-water mark, so compare
memory one preset per run. Run nothing else while benchmarking.

    python bench.py --data --presets=cifar10 --steps=1   # input pipeline vs the model
    python bench.py --data --presets=                    # input pipeline only

--data first times data.train_dataset alone (shuffle, batch, preprocess; nothing consumes the
batches but the loop) on mnist5k and on 50,000 random cifar10-shaped images in a temporary
.npy, then the presets' train steps, and prints how many times faster the pipeline is.

How fast the model learns and how well it compresses: bench_quality.py.
"""
import collections
import glob
import json
import os
import resource
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags
import keras
import numpy as np
import tensorflow as tf

import console
import data
import errors
import hparams
import model as vdvae
import sampling
import steps

flags.DEFINE_list('presets', ['cifar10', 'imagenet32'], 'presets to measure')
flags.DEFINE_integer('batch', 8, 'batch size')
flags.DEFINE_integer('steps', 3, 'steady-state steps to time after the first')
flags.DEFINE_list('paths', ['train', 'eval', 'sample'], 'what to time: train (train.py\'s step), eval '
                  '(its ELBO evaluation step), sample (sample.py\'s sampler, temperature 0.85)')
flags.DEFINE_integer('eval_batch', 32, 'batch size of eval and sample')
flags.DEFINE_enum('precision', 'float32', ['float32', 'mixed_bfloat16'], 'compute precision, as train.py\'s '
                  '(bfloat16 is measured only where the CPU has bfloat16 units)')
flags.DEFINE_boolean('remat', False, 'train.py --remat: rematerialise each block\'s activations')
flags.DEFINE_boolean('ceiling', True, 'time a bare 3x3 conv in float32 (and bfloat16) first: this '
                     'machine\'s conv throughput, against which the model\'s is given')
flags.DEFINE_boolean('grappler', True, 'Grappler graph optimisation, on as in train.py and sample.py '
                     '(off here: sooner to the first train step, slower train steps)')
flags.DEFINE_enum('layout', 'stacked', ['stacked', 'naive'],
                  "stacked: this project's model; naive: the same model with one variable per "
                  'conv kernel and bias, TF-op GELU with autodiff and no per-block functions')
flags.DEFINE_boolean('jit_compile', False, 'compile each timed path as one XLA program (as a TPU does)')
flags.DEFINE_alias('xla', 'jit_compile')
flags.DEFINE_string('profile', None, 'a folder: TensorFlow\'s profile of one more call of each timed path '
                    'goes to FOLDER/PRESET-PATH, summarised in one line (where the op time went) and '
                    'shown by TensorBoard\'s profile tab; the peak memory then includes the profiler\'s')
flags.DEFINE_boolean('data', False, 'also time the input pipeline alone (images/s)')
flags.DEFINE_float('data_seconds', 3., 'seconds to time each input pipeline for')
FLAGS = flags.FLAGS


def random_batch(hp, batch):
    """Random (x_in, target): the model's cost does not depend on the pixels."""
    shape = (batch, hp.image_size, hp.image_size, 3)
    rng = np.random.default_rng(0)
    return (tf.constant(rng.normal(size=shape), tf.float32),
            tf.constant(rng.integers(0, 256, size=shape) / 127.5 - 1., tf.float32))


def timed(run, repeats, profile=None):
    """Seconds of the first call of `run` (trace, graph optimisation, run) and the median of
    `repeats` more. `profile`: a folder for TensorFlow's profile of one call more, made after
    the timed ones so that the profiler's cost stays out of the times."""
    t0 = time.time()
    run()
    first = time.time() - t0
    times = []
    for _ in range(repeats):
        t0 = time.time()
        run()
        times.append(time.time() - t0)
    if profile:
        tf.profiler.experimental.start(profile)
        try:
            run()
        finally:
            tf.profiler.experimental.stop()
    return first, float(np.median(times))


def bench_train_step(hp, batch, repeats, remat=False, jit_compile=False, profile=None, layout='stacked'):
    """train.py's own step (the update rule: clip, skip, EMA, the official AdamW) on a model of
    `layout` (VDVAE's). Memory: the resident size once the model and optimizer are built, and
    the process's peak after training."""
    strategy = tf.distribute.get_strategy()
    t0 = time.time()
    state = steps.create_state(hp, strategy, remat=remat, layout=layout)
    build = time.time() - t0
    resident = rss_gb()
    step = steps.make_train_step(state, hp, strategy, jit_compile=jit_compile)
    x_in, target = random_batch(hp, batch)
    t0 = time.time()
    step.get_concrete_function(x_in, target)
    trace = time.time() - t0
    first, steady = timed(lambda: float(step(x_in, target)['elbo']), repeats, profile)
    return state.model, dict(variables=len(state.model.trainable_variables), build=build, trace=trace,
                             first=trace + first, step=steady, img_s=batch / steady, resident_gb=resident,
                             peak_gb=peak_rss_gb())


def bench_eval(model, hp, batch, repeats, jit_compile=False, profile=None):
    """train.py's evaluation step (the negative ELBO of a batch, noise seeded per batch)."""
    step = steps.make_eval_step(model, hp, tf.distribute.get_strategy(), jit_compile)
    x_in, target = random_batch(hp, batch)
    mask = tf.ones([batch])
    first, steady = timed(lambda: float(step(x_in, target, mask)['elbo']), repeats, profile)
    return dict(first=first, step=steady, img_s=batch / steady, peak_gb=peak_rss_gb())


def bench_sampling(model, batch, repeats, jit_compile=False, profile=None):
    """sample.py's sampler at temperature 0.85."""
    sampler = sampling.make_sampler(model, jit_compile)
    first, steady = timed(lambda: sampler(batch, 0.85, [0, 0]).numpy(), repeats, profile)
    return dict(first=first, step=steady, img_s=batch / steady, peak_gb=peak_rss_gb())


# ---------------------------------------------------------------------------------------
# This machine: its conv throughput, bf16 units, memory.
CEILING_CONV = (16, 32, 32, 96, 96)       # batch, height, width, channels in, out; 3x3, SAME


def conv_ceiling(dtype, seconds=2.):
    """GFLOP/s of one bare 3x3 conv (CEILING_CONV) in `dtype`: what this machine's convolution
    kernels reach, the ceiling for a model made of convolutions."""
    b, h, w, c_in, c_out = CEILING_CONV
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(b, h, w, c_in)), dtype)
    kernel = tf.constant(rng.normal(size=(3, 3, c_in, c_out)) * 0.1, dtype)
    run = tf.function(lambda x, k: tf.reduce_sum(tf.cast(tf.nn.conv2d(x, k, 1, 'SAME')[0, 0, 0], tf.float32)))
    for _ in range(3):
        run(x, kernel).numpy()
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        run(x, kernel).numpy()
        n += 1
    return 2 * b * h * w * 9 * c_in * c_out * n / (time.time() - t0) / 1e9


def conv_flops(model, batch, path):
    """Multiply-adds x 2 of every convolution one step of `path` runs: train (forward, then
    the gradients of inputs and of kernels: 3x the forward), eval (the posterior pass) or
    sample (the prior path). Element-wise work is not counted; rematerialised forwards are not
    counted either (work done again is not work done). Which convs a block has and which of
    them the prior path runs: model.block_convs."""
    per_pixel = lambda kernel: 2 * batch * int(np.prod(kernel))
    hp, total = model.hp, 0
    if path != 'sample':
        total += per_pixel(model.encoder.in_kernel.shape) * hp.image_size ** 2
    for block in model.encoder.blocks + model.decoder.blocks:
        stack, convs = block.row.stack, vdvae.block_convs(block)
        kernels = [prefix + 'kernel' for prefix, _, prior_path in convs if prior_path or path != 'sample']
        total += sum(per_pixel(stack.pieces[stack.index[k]][1]) for k in kernels) * block.res ** 2
    total += sum(per_pixel(b.unpool.kernel.shape) * b.mixin ** 2 for b in model.decoder.blocks if b.unpool is not None)
    total += per_pixel(model.decoder.out_kernel.shape) * hp.image_size ** 2
    return total * (3 if path == 'train' else 1)


def cpuinfo(key):
    """The value of the first `key` line of /proc/cpuinfo ('' where there is none, or no Linux)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.split(':')[0].strip() == key), '')
    except OSError:
        return ''


def bf16_units():
    """The CPU's bfloat16 instruction sets named in /proc/cpuinfo (empty: none, or not Linux)."""
    return sorted({'avx512_bf16', 'amx_bf16'} & set(cpuinfo('flags').split()))


def rss_gb():
    """This process's resident memory now."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e9


def peak_rss_gb():
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def profile_summary(folder):
    """Where a profiled call's CPU time went: (share per kind, share per op type), from
    TensorFlow's trace (the newest .xplane.pb under `folder`). Kinds: the convolutions
    and matrix products, XLA's kernels (fastgraph's GELU and adds), every other TensorFlow op.
    Time is summed over the threads that run ops, so two ops at once count twice. None where
    the trace has an accelerator's plane (its kernels run there, not in these ops), where
    there is no trace, or where this TensorFlow does not ship the trace's format."""
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        return None
    files = sorted(glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
    if not files:       # the profiler wrote nothing (it says why on stderr)
        return None
    space = xplane_pb2.XSpace()
    with open(files[-1], 'rb') as f:
        space.ParseFromString(f.read())
    if any(plane.name.startswith('/device:') for plane in space.planes):
        return None
    by_type, by_kind = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if meta.name == 'CpuExecutable::ExecuteAsyncOnStream':
                    kind, op = 'XLA kernels', 'XLA'
                elif meta.display_name and 'PartitionedCall' not in meta.display_name:   # a TensorFlow op
                    op = meta.display_name
                    kind = 'convolutions and matrix products' if 'Conv' in op or 'MatMul' in op else 'other ops'
                else:
                    continue
                by_kind[kind] += event.duration_ps
                by_type[op] += event.duration_ps
    total = sum(by_kind.values()) or 1
    return ({k: v / total for k, v in by_kind.most_common()}, {k: v / total for k, v in by_type.most_common()})


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
            except errors.DataError as e:
                console.fail(e)
            print(f'input pipeline {label:<19} batch {batch:>3}: {rates[label]:>9,.0f} images/s',
                  flush=True)
    return rates


def main(_):
    paths = [p for p in FLAGS.paths if p]
    if set(paths) - {'train', 'eval', 'sample'} or not paths:
        console.fail(f'--paths={",".join(FLAGS.paths)}: choose from train, eval, sample')
    console.at_least(batch=1, eval_batch=1, steps=1)
    if FLAGS.profile and os.path.isfile(FLAGS.profile):     # an empty one console.run refuses already
        console.fail(f'--profile={FLAGS.profile}: give a folder for the profiles (it is made if missing)')
    presets = {name: console.exit_on_error(hparams.load, name) for name in FLAGS.presets}
    pipeline = bench_pipelines(FLAGS.batch, FLAGS.data_seconds) if FLAGS.data else None
    if not FLAGS.grappler:
        tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})
    units, precision = bf16_units(), FLAGS.precision
    if precision == 'mixed_bfloat16' and not units:
        print('this CPU has no bfloat16 units (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo): '
              'measuring float32 only')
        precision = 'float32'
    machine = dict(cpu=cpuinfo('model name') or 'unknown CPU', cpus=os.cpu_count(), bf16_units=units, tensorflow=tf.__version__,
                   keras=keras.__version__)
    if FLAGS.ceiling:
        machine['conv_gflops'] = {'float32': conv_ceiling(tf.float32)}
        if units:
            machine['conv_gflops']['bfloat16'] = conv_ceiling(tf.bfloat16)
    settings = dict(layout=FLAGS.layout, grappler=FLAGS.grappler, xla=FLAGS.jit_compile, precision=precision,
                    remat=FLAGS.remat)
    print(f'{machine["cpu"]}, {machine["cpus"]} cpus, bfloat16 units: {", ".join(units) or "none"}; '
          f'tensorflow {tf.__version__}, keras {keras.__version__}')
    if FLAGS.ceiling:
        print('bare 3x3 conv {}x{}x{}x{} -> {}: '.format(*CEILING_CONV) + ', '.join(
            f'{v:.0f} GFLOP/s in {k}' for k, v in machine['conv_gflops'].items()))
    print(', '.join(f'{k} {"on" if v is True else "off" if v is False else v}' for k, v in settings.items()))
    ceiling = machine.get('conv_gflops', {}).get('bfloat16' if precision == 'mixed_bfloat16' else 'float32')
    if precision != 'float32':
        keras.config.set_dtype_policy(precision)
    print(f'{"preset":<11} {"path":<6} {"batch":>5} {"params":>12} {"first s":>8} {"step s":>7} {"img/s":>6} '
          f'{"GFLOP/s":>8} {"of conv":>7} {"model GB":>8} {"peak GB":>7}')
    rows = []
    for name, hp in presets.items():
        model = None
        for path in paths:
            batch = FLAGS.batch if path == 'train' else FLAGS.eval_batch
            profile = os.path.join(FLAGS.profile, f'{name}-{path}') if FLAGS.profile else None
            if path == 'train':
                model, r = bench_train_step(hp, batch, FLAGS.steps, FLAGS.remat, FLAGS.jit_compile, profile,
                                            FLAGS.layout)
            else:
                model = model or vdvae.VDVAE(hp, layout=FLAGS.layout)
                r = (bench_eval(model, hp, batch, FLAGS.steps, FLAGS.jit_compile, profile) if path == 'eval'
                     else bench_sampling(model, batch, FLAGS.steps, FLAGS.jit_compile, profile))
            r.update(preset=name, path=path, batch=batch, params=vdvae.count_params(model),
                     gflops=conv_flops(model, batch, path) / r['step'] / 1e9)
            r['of_conv'] = r['gflops'] / ceiling if ceiling else None
            rows.append(r)
            print(f'{name:<11} {path:<6} {batch:>5} {r["params"]:>12,} {r["first"]:>8.1f} {r["step"]:>7.2f} '
                  f'{r["img_s"]:>6.2f} {r["gflops"]:>8.0f} {format(r["of_conv"], ".0%") if ceiling else "-":>7} '
                  f'{format(r["resident_gb"], ".2f") if "resident_gb" in r else "-":>8} {r["peak_gb"]:>7.2f}',
                  flush=True)
            if profile:
                summary = profile_summary(profile)
                if summary:
                    r['profile'] = summary[0]
                    print(f'{"":<11} op time: ' + ', '.join(f'{v:.0%} {k}' for k, v in summary[0].items())
                          + '; most: ' + ', '.join(f'{k} {v:.0%}' for k, v in list(summary[1].items())[:4]), flush=True)
            if path == 'train' and pipeline and hp.image_size == 32:
                rate = pipeline['cifar10-shaped npy']
                print(f'{"":<11} the cifar10-shaped input pipeline delivers {rate:,.0f} images/s, '
                      f'{rate / r["img_s"]:,.0f}x what this train step consumes', flush=True)
    print('first s: the first call (trace, graph optimisation, run; train: from the built model). model GB: '
          'resident once the model and optimizer are built; peak GB: the process\'s peak so far (one preset per '
          'run to compare memory)')
    if FLAGS.profile:
        print(f'profiles of one call of each path: {FLAGS.profile}/PRESET-PATH (TensorBoard\'s profile tab shows them: '
              f'pip install tensorboard-plugin-profile && tensorboard --logdir={FLAGS.profile})')
    print(json.dumps(dict(machine=machine, settings=settings, rows=rows)))


if __name__ == '__main__':
    console.run(main)
