"""compress.py: bits-back coding with the model is lossless, costs about the negative ELBO, and
refuses files that are not whole or not for this model."""
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import cli
import coder
from conftest import fit
import data
import errors
import hparams
import likelihood
import model as vdvae
import steps

pytest.importorskip('constriction')


def _digits(n, size=16, seed=0):
    """Real digits (mnist5k's held-out ones), at the tiny preset's size."""
    split = data.load_split('mnist5k', 'valid', size)
    images = np.stack(list(split.take(n + seed).as_numpy_iterator()))[seed:]
    return images


@pytest.fixture(scope='module')
def trained():
    """The tiny preset after 60 updates on digits: some latent channels in use, most not."""
    hp = hparams.load('tiny')
    keras.utils.set_random_seed(0)
    m = vdvae.VDVAE(hp)
    images = np.stack(list(data.load_split('mnist5k', 'train', 16).take(64).as_numpy_iterator()))
    fit(m, *data.preprocess(images, hp), 60)
    return m


@pytest.mark.parametrize('which', ['random', 'trained'])
def test_decompressed_images_equal_the_inputs_byte_for_byte(which, trained):
    if which == 'random':        # at initialisation every KL is tiny: code every latent (skip_kl=0)
        keras.utils.set_random_seed(1)
        m, skip_kl = vdvae.VDVAE(hparams.load('tiny')), 0.
        images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3)).astype(np.uint8)
    else:
        m, skip_kl, images = trained, 1e-2, _digits(11)
    blob, stats = coder.compress(m, images, batch=4, skip_kl=skip_kl, grid=2.3, progress=False)   # not a float32
    assert stats['coded_channels'] > 0                  # the bits-back path is exercised
    assert coder.batches(len(images), 4) == ([1, 2, 4] if which == 'random' else [1, 2, 4, 4])
    np.testing.assert_array_equal(coder.decompress(m, blob, progress=False), images)


def test_pixel_tables_are_the_likelihood_of_each_colour_given_the_earlier_ones(trained):
    """Red, green given red, blue given both: their product is the DMoL's probability of
    the pixel, as dmol_log_probs computes it."""
    images = _digits(2)
    x_in, target = data.preprocess(images, trained.hp)
    params = trained.decode(trained.posterior_latents(x_in, seed=[0, 0]))
    pixels = coder.Pixels(params.numpy())
    flat = images.reshape(-1, 3)
    rows = np.arange(len(flat))
    log_p = sum(np.log(pixels.table(c, flat, rows)[rows, flat[:, c]]) for c in range(3))
    expected = likelihood.dmol_log_probs(params, target).numpy().ravel()
    # The likelihood works in float32 and approximates bins under 1e-5 by their density.
    np.testing.assert_allclose(np.exp(log_p), np.exp(expected), atol=1e-4)
    assert log_p.sum() == pytest.approx(expected.sum(), rel=1e-3)
    for c in range(3):
        np.testing.assert_allclose(pixels.table(c, flat, rows).sum(axis=1), 1., atol=1e-9)


def test_coding_every_latent_costs_the_negative_elbo_once_the_stack_is_primed(trained):
    """The marginal cost of images (a longer file minus a shorter one) with every latent
    coded (skip_kl=0) is the model's negative ELBO, plus the grid's small overhead."""
    images = _digits(40)
    short, _ = coder.compress(trained, images[:8], batch=1, skip_kl=0., progress=False)
    long, _ = coder.compress(trained, images, batch=1, skip_kl=0., progress=False)
    marginal = 8 * (len(long) - len(short)) / (32 * images[0].size)
    x_in, target = data.preprocess(images[8:], trained.hp)
    elbo = np.mean([trained.losses_per_image(x_in, target, seed=[s, 0])['elbo'].numpy().mean()
                    for s in range(4)]) / math.log(2)
    assert marginal == pytest.approx(elbo, rel=0.03), (marginal, elbo)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, trained):
    """Two run folders of the tiny preset with different weights."""
    root = tmp_path_factory.mktemp('compress')
    folders = []
    for k in range(2):
        folder = str(root / f'run{k}')
        keras.utils.set_random_seed(k)
        state = steps.create_state(hparams.load('tiny'), tf.distribute.get_strategy())
        if k == 0:
            for v, w, e in zip(state.model.weights, trained.weights, state.ema):
                e.assign(w)
        checkpoints.check_run_folder(folder, hparams.load('tiny'))
        tf.train.CheckpointManager(state.checkpoint(), os.path.join(folder, 'ckpt'), 1).save(checkpoint_number=1)
        folders.append(folder)
    np.save(root / 'digits.npy', _digits(5))
    return root, folders


def test_the_command_line_round_trip_and_its_errors(runs):
    root, (mine, other) = runs
    out = str(root / 'digits.vdvae')
    r = cli.run('compress.py', f'--ckpt={mine}', f'--images={root}/digits.npy', f'--out={out}', '--batch=2')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '5 images, 3,840 bytes raw' in r.stdout and 'bits/dim' in r.stdout and 'images/s' in r.stdout
    r = cli.run('compress.py', f'--decompress={out}', f'--ckpt={mine}', f'--out={root}/back.npy')
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.load(root / 'back.npy'), np.load(root / 'digits.npy'))
    r = cli.run('compress.py', f'--decompress={out}', f'--ckpt={mine}', f'--out={root}/pngs')
    assert r.returncode == 0 and sorted(os.listdir(root / 'pngs')) == [f'{i:06d}.png' for i in range(5)]
    # One line each, and nothing written or overwritten.
    blob = open(out, 'rb').read()
    line = cli.error_line(cli.run('compress.py', f'--decompress={out}', f'--ckpt={other}', f'--out={root}/x.npy'))
    assert 'compressed with another model' in line and not os.path.exists(root / 'x.npy')
    (root / 'corrupt.vdvae').write_bytes(blob[:-9] + bytes([blob[-9] ^ 1]) + blob[-8:])
    line = cli.error_line(cli.run('compress.py', f'--decompress={root}/corrupt.vdvae', f'--ckpt={mine}',
                                  f'--out={root}/x.npy'))
    assert 'corrupt' in line and not os.path.exists(root / 'x.npy')
    (root / 'short.vdvae').write_bytes(blob[:len(blob) // 2])
    line = cli.error_line(cli.run('compress.py', f'--decompress={root}/short.vdvae', f'--ckpt={mine}',
                                  f'--out={root}/x.npy'))
    assert 'truncated' in line and not os.path.exists(root / 'x.npy')
    line = cli.error_line(cli.run('compress.py', f'--ckpt={mine}', f'--images={root}/digits.npy', f'--out={out}'))
    assert 'exists; pass --overwrite' in line and open(out, 'rb').read() == blob
    np.save(root / 'big.npy', np.zeros((2, 32, 32, 3), np.uint8))
    line = cli.error_line(cli.run('compress.py', f'--ckpt={mine}', f'--images={root}/big.npy', f'--out={root}/big.vdvae'))
    assert 'this model takes 16x16' in line and not os.path.exists(root / 'big.vdvae')
    (root / 'notes.txt').write_text('not ours')
    line = cli.error_line(cli.run('compress.py', f'--decompress={root}/notes.txt', f'--ckpt={mine}', f'--out={root}/x.npy'))
    assert 'not a file written by compress.py' in line


def test_without_constriction_it_says_how_to_install_it(runs, tmp_path):
    (tmp_path / 'constriction.py').write_text('raise ImportError("no constriction here")\n')
    root, (mine, _) = runs
    r = cli.run('compress.py', f'--ckpt={mine}', f'--images={root}/digits.npy', f'--out={tmp_path}/x.vdvae',
                env=dict(PYTHONPATH=str(tmp_path)))
    assert 'pip install constriction==0.5.0' in cli.error_line(r)


def test_a_decoder_whose_floats_differ_ends_in_one_error_not_in_wrong_images(trained, monkeypatch):
    """Another machine's floats, played by weights 0.1% off under a hash that still matches."""
    images = _digits(3)
    monkeypatch.setattr(coder, 'weights_hash', lambda m: bytes(32))
    blob, _ = coder.compress(trained, images, batch=2, progress=False)
    other = vdvae.VDVAE(trained.hp)
    rng = np.random.default_rng(0)
    for v, w in zip(other.weights, trained.weights):
        v.assign(w * (1. + 1e-3 * rng.standard_normal(w.shape)).astype(np.float32))
    with pytest.raises(errors.FileError, match='did not end where the encoder began'):
        coder.decompress(other, blob, progress=False)
