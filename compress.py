"""Lossless image compression with a trained VDVAE, on the command line: image files to one
compressed file and back. The coding itself (bits-back ANS through the hierarchy) is coder.py's.

    python compress.py --ckpt=runs/demo --images=digits/ --out=digits.vdvae
    python compress.py --decompress=digits.vdvae --ckpt=runs/demo --out=restored/

A file is promised to decode on the machine and TensorFlow build that wrote it (coder.py's docstring
says why); elsewhere a difference ends in one error line, not in wrong images.
"""
import io
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags
import numpy as np
import tensorflow as tf

import checkpoints
import coder
import console
import data
import errors
import files
from figures import write_png


def define_flags():
    flags.DEFINE_string('ckpt', None, 'run folder or ckpt-N prefix: the model (EMA weights) that codes')
    flags.DEFINE_string('images', None, 'compress: a folder of images, an image file or an (N, S, S, 3) uint8 .npy')
    flags.DEFINE_string('out', None, 'compress: the file to write; decompress: a folder of PNGs or a .npy')
    flags.DEFINE_string('decompress', None, 'a file written by compress.py, to decode')
    flags.DEFINE_integer('batch', 4, 'compress: largest batch (a file decodes with the batches it was made with)')
    flags.DEFINE_float('grid', 2., 'compress: grid points per prior standard deviation of a latent')
    flags.DEFINE_float('skip_kl', 1e-2, 'compress: latent channels with a mean KL below this (nats '
                       'per element, on the images coded) are not coded; 0: code every latent')
    flags.DEFINE_boolean('overwrite', False, 'replace an existing --out')


# ---------------------------------------------------------------------------------------
# The command line.
def _write(path, blob):
    with files.writing(path, 'the file', '; nothing was written'):
        files.write_whole(path, blob)


def _refuse_existing(path):
    if os.path.exists(path) and not FLAGS.overwrite and not (os.path.isdir(path) and not os.listdir(path)):
        console.fail(f'{path} exists; pass --overwrite or another --out')


def compress_main(model, hp):
    if not FLAGS.images:
        console.fail('--images is required: a folder of images, an image file or a .npy')
    if FLAGS.grid <= 0 or FLAGS.skip_kl < 0:
        console.fail(f'--grid={FLAGS.grid} must be positive and --skip_kl={FLAGS.skip_kl} not negative')
    _refuse_existing(FLAGS.out)
    try:
        images = data.read_images(FLAGS.images, hp, 2 ** 31)
    except errors.DataError as e:
        console.fail(e)
    if not len(images):
        console.fail(f'--images={FLAGS.images}: no images in it')
    blob, stats = coder.compress(model, images, FLAGS.batch, FLAGS.grid, FLAGS.skip_kl)
    _write(FLAGS.out, blob)
    dims = images[0].size
    print(f'{len(images)} images, {images.nbytes:,} bytes raw -> {len(blob):,} bytes: '
          f'{8 * len(blob) / (len(images) * dims):.4f} bits/dim; one-time start-up bits '
          f'{stats["initial_bits"]:,} ({stats["initial_bits"] / (8 * len(blob) / len(images)):.1f} images\' '
          f'worth); {stats["coded_channels"]} of {model.num_layers * hp.zdim} latent channels coded; '
          f'{stats["images_per_second"]:.1f} images/s\nwrote {FLAGS.out}')


def decompress_main(model):
    if FLAGS.images:
        console.fail('--images is for compressing; --decompress reads the file')
    if not os.path.isfile(FLAGS.decompress):
        console.fail(f'--decompress={FLAGS.decompress}: no such file')
    _refuse_existing(FLAGS.out)
    t0 = time.time()
    try:
        images = coder.decompress(model, open(FLAGS.decompress, 'rb').read(), FLAGS.decompress)
    except errors.FileError as e:
        console.fail(e)
    seconds = time.time() - t0
    if FLAGS.out.endswith('.npy'):
        buffer = io.BytesIO()
        np.save(buffer, images)
        _write(FLAGS.out, buffer.getvalue())
    else:
        for i, image in enumerate(images):
            write_png(image, os.path.join(FLAGS.out, f'{i:06d}.png'))
    print(f'{len(images)} images in {seconds:.1f} s ({len(images) / seconds:.1f} images/s)\nwrote {FLAGS.out}')


def main(_):
    tf.get_logger().setLevel('ERROR')
    coder.load_constriction()
    for name in ('ckpt', 'out'):
        if not FLAGS[name].value:
            console.fail(f'--{name} is required')
    console.at_least(batch=1)
    model, hp, _, path, step = checkpoints.load(FLAGS.ckpt)
    if hp.low_bit:
        console.fail(f'{path}: a 5-bit (low_bit) model; compress.py codes 8-bit images only')
    print(f'{path}: {hp.dataset} {hp.image_size}x{hp.image_size}, EMA weights at step {step}')
    if FLAGS.decompress:
        decompress_main(model)
    else:
        compress_main(model, hp)


FLAGS = flags.FLAGS

if __name__ == '__main__':
    define_flags()
    console.run(main)
