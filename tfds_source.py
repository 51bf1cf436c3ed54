"""tfds's datasets for data.py: cifar10 and downsampled ImageNet read with tensorflow-datasets,
the official code's cifar10 split rebuilt from tfds's example ids, and, when tfds cannot
prepare a dataset, one line that names the real cause: a missing module (with its pip
line), no network, or a source file that is not the original (tests/test_tfds.py runs that
path for real, offline). data._split calls split() for the names in TFDS, with the number of
images its table holds out; this module imports no other of the project's but errors.py.
tensorflow_datasets is imported on first use: it is slow to import, and only these need it."""
import os
import re

import numpy as np
import tensorflow as tf

import errors

# Our name -> (tfds's name, the tfds split that is our test split).
TFDS = {'cifar10': ('cifar10', 'test'),
        'imagenet32': ('downsampled_imagenet/32x32', 'validation'),
        'imagenet64': ('downsampled_imagenet/64x64', 'validation')}


def split(dataset, split, image_size, data_dir, held_out):
    """For data._split: (keys, decode, size) of a tfds dataset's split, its images as the keys,
    each checked for shape; `held_out` training images are the valid split."""
    import tensorflow_datasets as tfds
    name, test_split = TFDS[dataset]
    source = test_split if split == 'test' else 'train'
    where = data_dir or f'the default tfds data_dir ({tfds.core.constants.DATA_DIR})'
    try:
        ds = tfds.load(name, split=source, shuffle_files=False, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; failure() sorts them
        raise errors.DataError(failure(name, source, data_dir, where, e)) from None
    size = None
    if dataset == 'cifar10' and split != 'test':
        ds, size = _cifar10_official(ds, split, where, held_out)
    # ImageNet: tfds's train order is fixed and was shuffled when the dataset was built, so
    # the first images are a random held-out set (not the official one: data.py's docstring).
    elif split == 'valid':
        ds = ds.take(held_out)
    elif split == 'train':
        ds = ds.skip(held_out)
    ds = ds.map(lambda example: example['image'])
    want = (image_size, image_size, 3)
    first = next(iter(ds.take(1)), None)
    if first is None:
        raise errors.DataError(f'{name}: split {split!r} in {where} has no images')
    if tuple(first.shape) != want:
        raise errors.DataError(f'{name} in {where}: {split} image 0 has shape '
                               f'{"x".join(map(str, first.shape))}, expected {"x".join(map(str, want))}')
    size = size or int(ds.cardinality())
    if size < 0:
        size = int(ds.reduce(0, lambda n, _: n + 1))

    def decode(image):   # the builder declares (None, None, 3): check every image
        check = tf.debugging.assert_equal(
            tf.shape(image), want, f'DataError: {name} in {where}: an image of another shape '
            f'than {"x".join(map(str, want))} in split {split!r}')
        with tf.control_dependencies([check]):
            return tf.ensure_shape(tf.identity(image), want)
    return ds, decode, size


def cifar10_held_out(n, held_out):
    """Positions in data_batch_1..5 of the official code's (valid, train) images: its
    scikit-learn train_test_split(test_size=held_out, random_state=11172018) draws one
    permutation from a RandomState of that seed; valid = its first `held_out`, train = the rest."""
    order = np.random.RandomState(11172018).permutation(n)
    return order[:held_out], order[held_out:]


def _cifar10_official(ds, split, where, held_out):
    """tfds's cifar10 train examples of the official split, in tfds's order. tfds shuffles
    the examples when it prepares them, but keeps each one's position in data_batch_1..5 in its
    `id` (train_00000 ... train_49999)."""
    n = int(ds.cardinality())
    valid, _ = cifar10_held_out(n, held_out)
    in_valid = np.zeros(n, bool)
    in_valid[valid] = True
    in_valid = tf.constant(in_valid)

    def keep(example):
        digits = tf.strings.regex_replace(example['id'], '^train_', '')
        ok = tf.strings.regex_full_match(digits, '[0-9]+')
        check = tf.debugging.assert_equal(ok, True, f'DataError: cifar10 in {where}: an example id '
                                          'is not train_N (the position the official split needs)')
        with tf.control_dependencies([check]):
            position = tf.strings.to_number(digits, tf.int64)
        return tf.gather(in_valid, position) == (split == 'valid')
    size = len(valid) if split == 'valid' else n - len(valid)
    return ds.filter(keep), size


# What tfds's first use of a dataset (download, then prepare) fails on, told apart so that the
# message names the real cause: a missing module is not a missing network.
TFDS_SOURCE_FILES = {'cifar10': ('cifar-10-binary.tar.gz',)}
TFDS_SOURCE_FILES.update({f'downsampled_imagenet/{s}x{s}': (f'train_{s}x{s}.tar', f'valid_{s}x{s}.tar')
                          for s in (32, 64)})
_NETWORK_SIGNS = ('Failed to resolve', 'Name or service not known', 'Could not resolve host',
                  'Temporary failure in name resolution', 'Network is unreachable',
                  'Connection refused', 'Failed to connect', "Couldn't connect", 'timed out')


def _causes(e):
    chain = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _is_network_error(e):
    import requests
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                      ConnectionError, TimeoutError)):
        return True
    return any(sign in str(e) for sign in _NETWORK_SIGNS)


def _pip_line(module):
    """`pip install` of the module's pinned requirement (requirements.txt), else its bare name."""
    top = module.split('.')[0]
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'requirements.txt')) as f:
            for line in f:
                pin = line.split('#')[0].strip()
                if re.split(r'[=<>~!]', pin)[0].strip().lower().replace('-', '_') == top.lower():
                    return f'pip install {pin}'
    except OSError:
        pass
    return f'pip install {top}'


def failure(name, source, data_dir, where, e):
    """The one line that says why tfds could not load `name` (the cause in e's chain)."""
    chain = _causes(e)
    missing = next((c for c in chain if isinstance(c, ImportError)), None)
    if missing is not None:
        module = missing.name or errors.first_line(missing)
        return (f'{name}: tensorflow-datasets needs the Python module {module!r} to load or prepare '
                f'it, and it is not installed: {_pip_line(module)}')
    network = any(_is_network_error(c) for c in chain)
    if network and str(data_dir).startswith('gs://'):
        return f'{name}: cannot reach {data_dir}: no network ({errors.first_line(e)})'
    kinds = {type(c).__name__ for c in chain}
    if 'NonMatchingChecksumError' in kinds:
        return (f'{name}: a source file is not the original, its checksum differs from the one tfds '
                f'expects ({errors.first_line(e)}). {_how_to_prepare(name)}')
    if network or 'DownloadError' in kinds:
        why = 'tfds cannot download it: no network' if network else 'its download failed'
        return f'{name}: not prepared in {where}, and {why} ({errors.first_line(e)}). {_how_to_prepare(name)}'
    return f'{name}: cannot load split {source!r} from {where}: {errors.first_line(e)}'


def _how_to_prepare(name):
    files = TFDS_SOURCE_FILES[name]
    manual = (f'put {" and ".join(files)} in DIR/downloads/manual/, where tfds checks '
              f'{"their checksums" if len(files) > 1 else "its checksum"}')
    if name.startswith('downsampled_imagenet'):
        size = name.split('/')[1].split('x')[0]
        return (f'image-net.org no longer serves these files: find copies (tensorflow/datasets#4662), '
                f'{manual}, and pass --data_dir=DIR; or pass the folder holding the official code\'s '
                f'imagenet{size}-train.npy and imagenet{size}-valid.npy')
    return (f'Where there is a network, tfds.builder("{name}", data_dir=DIR).download_and_prepare() '
            f'prepares it (or {manual}); then pass --data_dir=DIR (a local folder or gs://)')
