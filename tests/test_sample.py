"""sample.py on a tiny checkpoint made here: EMA loading, temperatures and schedules,
reconstructions from the first k latents, per-layer rate, and the command line's errors."""
import csv
import math
import os

import keras
import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

import checkpoints
import cli
import data
import figures
import hparams
import sampling
import steps

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A run folder whose EMA weights differ from its raw weights everywhere, so loading the
    wrong ones shows, and whose prior is not the all-zero initial one."""
    folder = str(tmp_path_factory.mktemp('run'))
    hp = hparams.load('tiny')
    keras.utils.set_random_seed(3)
    state = steps.create_state(hp, tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    for e in state.ema:
        e.assign(e + rng.normal(0, 0.05, e.shape).astype(np.float32))
    checkpoints.check_run_folder(folder, hp)
    tf.train.CheckpointManager(state.checkpoint(), os.path.join(folder, 'ckpt'), 1).save(checkpoint_number=7)
    return folder, [e.numpy() for e in state.ema]


@pytest.fixture(scope='module')
def loaded(run):
    return checkpoints.load(run[0])[0]


def test_load_gives_the_ema_weights_the_hparams_and_the_step(run):
    m, hp, folder, path, step = checkpoints.load(run[0])
    assert hp == hparams.load('tiny') and folder == run[0] and path.endswith('ckpt-7') and step == 0
    for v, e in zip(m.weights, run[1]):
        np.testing.assert_array_equal(v.numpy(), e, err_msg=v.path)


@pytest.mark.smoke
def test_the_cli_writes_a_grid_of_the_requested_shape(run, tmp_path):
    out = str(tmp_path / 'grid.png')
    r = cli.run('sample.py', f'--ckpt={run[0]}', '--temp=0.85', '--n=6', '--nrow=3', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'images/s' in r.stdout
    image = np.asarray(Image.open(out))
    assert image.dtype == np.uint8 and image.shape == (2 * 17 - 1, 3 * 17 - 1, 3)   # 16 px + 1 px gaps
    # One labelled row per temperature, upscaled 4x for legibility.
    out2 = str(tmp_path / 'rows.png')
    r = cli.run('sample.py', f'--ckpt={run[0]}', '--temp=1.0,0.5,0.0', '--n=4', '--nrow=4', f'--out={out2}')
    assert r.returncode == 0, r.stderr[-2000:]
    rows = np.asarray(Image.open(out2))
    assert rows.shape[0] == 4 * (3 * 17 - 1) and rows.shape[1] > 4 * (4 * 17 - 1)


@pytest.mark.smoke
def test_same_seed_same_images_and_one_graph_per_batch_size(loaded):
    sampler = sampling.make_sampler(loaded)
    a = sampling.generate(sampler, 6, 1.0, seed=5, batch=4)
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, sampling.generate(sampler, 6, 1.0, seed=5, batch=4))
    assert not np.array_equal(a, sampling.generate(sampler, 6, 1.0, seed=6, batch=4))
    # Batches of 4 and 2 so far; other temperatures and schedules reuse those graphs.
    sampling.generate(sampler, 6, 0.3, seed=5, batch=4)
    sampling.generate(sampler, 6, np.linspace(0, 1, loaded.num_layers), seed=5, batch=4)
    assert sampler.graph.experimental_get_tracing_count() == 2
    # The prior path only: the sampling graph never reads the encoder.
    concrete = sampler.graph.get_concrete_function(4, tf.TensorSpec([loaded.num_layers]),
                                                  tf.TensorSpec([2], tf.int32))
    read = {id(v) for v in concrete.variables}
    assert not read & {id(v.value) for v in loaded.encoder.weights}
    assert read & {id(v.value) for v in loaded.decoder.weights}


def test_lower_temperature_gives_less_variation_across_samples(run):
    m = checkpoints.load(run[0])[0]
    # Near-deterministic pixels (one mixture component, tiny scales), so what varies between
    # samples is what the latents make vary.
    M, bias = m.hp.num_mixtures, m.decoder.out_bias.numpy()
    bias[0] = 30.
    for c in range(3):
        bias[M + 3 * M * c + M:M + 3 * M * c + 2 * M] = -7.
    m.decoder.out_bias.assign(bias)
    sampler = sampling.make_sampler(m)
    variance = {t: sampling.generate(sampler, 32, t, seed=1, batch=32).astype(np.float64).var(0).mean()
                for t in (0.0, 0.5, 1.0)}
    assert variance[0.0] < 0.5 * variance[0.5] < 0.5 * variance[1.0], variance
    # At temperature 0 every latent is its prior mean: the distribution over pixels is the
    # same whatever the seed.
    p = [m.decode([], 2, 0.0, seed=[s, 0]).numpy() for s in (1, 2)]
    np.testing.assert_allclose(p[0], p[1], atol=1e-6)
    np.testing.assert_allclose(p[0][0], p[0][1], atol=1e-6)


def test_temperature_schedules(loaded):
    L, res = loaded.num_layers, np.array([b.res for b in loaded.decoder.blocks])
    rows = sampling.parse_temperatures('1.0,0.9', loaded)
    assert [t for _, t in rows] == [1.0, 0.9]
    (_, ramp), = sampling.parse_temperatures('ramp:0.2:1.0', loaded)
    np.testing.assert_allclose(ramp, np.linspace(0.2, 1.0, L))
    (_, per_res), = sampling.parse_temperatures('res:1=0.5,16=0.7', loaded)
    np.testing.assert_allclose(per_res, np.where(res == 1, 0.5, np.where(res == 16, 0.7, 1.0)))
    values = ','.join(str(0.1 * i) for i in range(L))
    (_, layers), (_, one) = sampling.parse_temperatures(f'layers:{values};0.85', loaded)
    assert layers.shape == (L,) and one == 0.85
    for bad, words in [(f'layers:{values},0.5', f'{L + 1} values; the decoder has {L} layers'),
                       ('layers:0.5', f'1 values; the decoder has {L} layers'),
                       ('res:3=0.5', 'resolutions [1, 4, 8, 16]'), ('warm', 'not a number'),
                       ('-1', '>= 0'), ('ramp:1', 'ramp:FIRST:LAST')]:
        with pytest.raises(ValueError, match=words.replace('[', r'\[')):
            sampling.parse_temperatures(bad, loaded)
    # A schedule reaches every layer: all zeros is temperature 0, and the ramp is neither end.
    sampler = sampling.make_sampler(loaded)
    zeros = sampling.generate(sampler, 4, np.zeros(L, np.float32), seed=2, batch=4)
    np.testing.assert_array_equal(zeros, sampling.generate(sampler, 4, 0.0, seed=2, batch=4))
    ramped = sampling.generate(sampler, 4, ramp, seed=2, batch=4)
    for t in (0.2, 1.0):
        assert not np.array_equal(ramped, sampling.generate(sampler, 4, t, seed=2, batch=4))


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 16, 16, 3)).astype(np.uint8)


def test_reconstruction_from_all_latents_is_the_models_own_decoding(loaded):
    images = _images()
    x_in, target = data.preprocess(images, loaded.hp)
    L = loaded.num_layers
    latents = loaded.posterior_latents(x_in, seed=[4, 0])
    # The prior path fed the posterior's latents computes what the posterior path computed.
    params_posterior, _ = loaded.decoder.top_down(4, acts=loaded.encoder.activations(x_in), seed=[4, 0])
    np.testing.assert_allclose(loaded.decode(latents), params_posterior, atol=1e-5)
    cold, warm = (sampling.reconstructions(loaded, x_in, [2, L], t, seed=4) for t in (0.1, 1.0))
    np.testing.assert_array_equal(cold[1], loaded.decode_images(latents, seed=[4, L]))
    np.testing.assert_array_equal(cold[1], warm[1])          # nothing left to the prior
    assert not np.array_equal(cold[0], warm[0])              # k=2: the rest comes from the prior
    share = sampling.latent_share(loaded)
    assert share[-1] == 1 and np.all(np.diff(share) > 0)
    assert share[0] == pytest.approx(4 / (4 + 3 * 16 * 4 + 3 * 64 * 4 + 3 * 256 * 4))   # zdim 4; 1, 3, 3, 3 layers


def test_reconstruct_cli_with_a_folder_of_images(run, tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i, image in enumerate(_images(3)):
        Image.fromarray(image).save(folder / f'{i}.png')
    out = str(tmp_path / 'rec.png')
    r = cli.run('sample.py', f'--ckpt={run[0]}', '--mode=reconstruct', f'--images={folder}', '--keep=1,5,10', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    share = sampling.latent_share(checkpoints.load(run[0])[0])
    for k in (1, 5, 10):
        assert f'k={k:4d}: first {k} of 10 layers, {100 * share[k - 1]:.2f}% of the latent dimensions' in r.stdout
    picture = np.asarray(Image.open(out))
    assert picture.shape[1] == 4 * (4 * 17 - 1) and picture.shape[0] > 4 * (3 * 17 - 1)


def test_stats_csv_sums_to_the_models_rate(run, tmp_path):
    images = _images(6, seed=1)
    np.save(tmp_path / 'images.npy', images)
    out = str(tmp_path / 'stats.png')
    r = cli.run('sample.py', f'--ckpt={run[0]}', '--mode=stats', f'--images={tmp_path}/images.npy', '--batch=4',
             '--seed=3', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / 'stats.csv')))
    m = checkpoints.load(run[0])[0]
    assert [int(r['layer']) for r in rows] == list(range(1, m.num_layers + 1))
    x_in, target = data.preprocess(images, m.hp)
    rate = np.concatenate([m.losses_per_image(x_in[i:i + 4], target[i:i + 4], seed=[3, i])['rate']
                           for i in (0, 4)]).mean() / math.log(2)
    kl = np.array([float(r['kl_bits_per_dim']) for r in rows])
    assert kl.sum() == pytest.approx(rate, rel=1e-5) and np.all(kl >= 0)
    assert float(rows[-1]['cumulative_bits_per_dim']) == pytest.approx(rate, rel=1e-5)
    assert float(rows[-1]['cumulative_latent_share']) == 1.0
    assert np.asarray(Image.open(out)).ndim == 3


def _variant_run(folder, seed, **variant):
    hp = hparams.load('tiny', **variant)
    keras.utils.set_random_seed(seed)
    state = steps.create_state(hp, tf.distribute.get_strategy())
    checkpoints.check_run_folder(folder, hp)
    tf.train.CheckpointManager(state.checkpoint(), os.path.join(folder, 'ckpt'), 1).save(checkpoint_number=1)
    return state.model


def test_stats_compares_figure_5s_variants_in_one_figure(tmp_path):
    runs = {'nearest': {}, 'learned': dict(unpool='learned'), 'ffn': dict(top_down_block='ffn')}
    models = {name: _variant_run(str(tmp_path / name), i, **v) for i, (name, v) in enumerate(runs.items())}
    images = _images(4, seed=5)
    np.save(tmp_path / 'images.npy', images)
    out = tmp_path / 'not-yet' / 'figure5.png'          # a folder stats makes
    r = cli.run('sample.py', '--mode=stats', '--ckpt=' + ','.join(str(tmp_path / n) for n in runs),
                f'--images={tmp_path}/images.npy', '--batch=4', '--seed=2', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / 'not-yet' / 'figure5.csv')))
    x_in, target = data.preprocess(images, models['nearest'].hp)
    for name, m in models.items():
        mine = [row for row in rows if row['run'] == str(tmp_path / name)]
        assert [int(row['layer']) for row in mine] == list(range(1, m.num_layers + 1))
        rate = m.losses_per_image(x_in, target, seed=[2, 0])['rate'].numpy().mean() / math.log(2)
        assert sum(float(row['kl_bits_per_dim']) for row in mine) == pytest.approx(rate, rel=1e-5), name
        assert f'{name}: rate {rate:.4f} bits/dim' in r.stdout
    picture = np.asarray(Image.open(out))
    # One colour per run: each run's line and its legend entry.
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert all(c in colours for c in figures.COLOURS[:3])
    # Runs on other data, or several checkpoints outside --mode=stats: one line each.
    _variant_run(str(tmp_path / 'wide'), 0, image_size=32, enc_blocks='32x1,32d2,16x1,16d4,4d4,1x1',
                 dec_blocks='1x1,4m1,16m4,32m16')
    line = cli.error_line(cli.run('sample.py', '--mode=stats', f'--ckpt={tmp_path}/nearest,{tmp_path}/wide'))
    assert 'compares runs on the same data' in line and 'wide is mnist5k 32x32' in line
    line = cli.error_line(cli.run('sample.py', f'--ckpt={tmp_path}/nearest,{tmp_path}/ffn'))
    assert 'only --mode=stats compares several' in line


def test_a_checkpoint_of_another_preset_is_refused(loaded, capsys):
    checkpoints.check_preset(loaded.hp, 'tiny')
    with pytest.raises(SystemExit) as exit:
        checkpoints.check_preset(loaded.hp, 'cifar10')
    assert exit.value.code == 2
    assert 'error: the checkpoint is not a cifar10 model: dataset, image_size, width' in capsys.readouterr().err


def test_bad_input_ends_in_one_line(run, tmp_path):
    assert 'no hparams.json' in cli.error_line(cli.run('sample.py', f'--ckpt={tmp_path}/nothing'))
    # A foreign checkpoint: another configuration's weights under this run's hparams.json.
    foreign = tmp_path / 'foreign'
    state = steps.create_state(hparams.load('tiny', width=16), tf.distribute.get_strategy())
    tf.train.CheckpointManager(state.checkpoint(), str(foreign / 'ckpt'), 1).save(checkpoint_number=1)
    (foreign / 'hparams.json').write_text(open(os.path.join(run[0], 'hparams.json')).read())
    assert 'cannot be restored' in cli.error_line(cli.run('sample.py', f'--ckpt={foreign}'))
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / 'digit.png')
    line = cli.error_line(cli.run('sample.py', f'--ckpt={run[0]}', '--mode=reconstruct', f'--images={tmp_path}/digit.png'))
    assert 'digit.png' in line and '16x16' in line
    assert '--keep means nothing with --mode=sample' in cli.error_line(cli.run('sample.py', f'--ckpt={run[0]}', '--keep=1,2'))
    (tmp_path / 'taken.png').write_bytes(b'mine')
    assert 'exists' in cli.error_line(cli.run('sample.py', f'--ckpt={run[0]}', f'--out={tmp_path}/taken.png'))
    assert (tmp_path / 'taken.png').read_bytes() == b'mine'
    (tmp_path / 'stats.csv').write_text('mine')        # written beside --out=stats.png
    line = cli.error_line(cli.run('sample.py', f'--ckpt={run[0]}', '--mode=stats', f'--out={tmp_path}/stats.png'))
    assert 'stats.csv exists' in line and (tmp_path / 'stats.csv').read_text() == 'mine'


def test_the_training_preview_shows_data_reconstructions_and_samples(loaded):
    images = _images(3, seed=2)
    picture = sampling.sample_grid(loaded, *data.preprocess(images, loaded.hp), seed=1)
    # data; k = 1, L/4, L/2, L (tiny: 1, 2, 5, 10) and k = L's mode; 3 temperatures, each sampled and mode
    rows = 1 + 4 + 1 + 2 * 3
    assert picture.dtype == np.uint8 and picture.shape[0] == 4 * (rows * 17 - 1)
    label_width = picture.shape[1] - 4 * (3 * 17 - 1)
    assert label_width > 0
    # The data row is the images themselves, upscaled 4x.
    for j, image in enumerate(images):
        cell = picture[:64, label_width + 4 * 17 * j:label_width + 4 * 17 * j + 64]
        np.testing.assert_array_equal(cell, image.repeat(4, 0).repeat(4, 1))
    # The mode row under each sample row: the same latents (its seed), the most likely pixels.
    x_in = data.preprocess(images, loaded.hp)[0]
    for row, expected in [(5, sampling.reconstructions(loaded, x_in, [loaded.num_layers], 0.1, 1, pixels='mode')[0]),
                          (7, loaded.sample(3, 1.0, [1, 1000], pixels='mode').numpy()),
                          (11, loaded.sample(3, 0.8, [1, 1002], pixels='mode').numpy())]:
        for j, image in enumerate(expected):
            top, left = 4 * 17 * row, label_width + 4 * 17 * j
            np.testing.assert_array_equal(picture[top:top + 64, left:left + 64], image.repeat(4, 0).repeat(4, 1))


def test_export_writes_n_samples_as_pngs_or_one_npz_reproducibly_and_never_over_old_ones(run, tmp_path):
    args = ['--mode=export', f'--ckpt={run[0]}', '--n=5', '--batch=2', '--temp=0.9']
    r = cli.run('sample.py', *args, f'--out={tmp_path}/pngs')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'sampling [' in r.stderr and 'wrote' in r.stdout         # a progress line, then the result
    names = sorted(os.listdir(tmp_path / 'pngs'))
    assert names == [f'{i:06d}.png' for i in range(5)] and not os.path.exists(tmp_path / 'pngs.part')
    pngs = np.stack([np.asarray(Image.open(tmp_path / 'pngs' / n)) for n in names])
    assert pngs.dtype == np.uint8 and pngs.shape == (5, 16, 16, 3)
    assert cli.run('sample.py', *args, f'--out={tmp_path}/a.npz').returncode == 0
    with np.load(tmp_path / 'a.npz') as f:
        assert list(f) == ['samples'] and f['samples'].dtype == np.uint8
        np.testing.assert_array_equal(f['samples'], pngs)          # the same seed, the same images
    # The images are the sampler's at that temperature and seed, batch by batch.
    np.testing.assert_array_equal(pngs, sampling.generate(sampling.make_sampler(checkpoints.load(run[0])[0]), 5, 0.9, 0, 2))
    assert cli.run('sample.py', *args, '--seed=1', f'--out={tmp_path}/b.npz').returncode == 0
    with np.load(tmp_path / 'b.npz') as f:
        assert not np.array_equal(f['samples'], pngs)
    # An existing output is refused, whole and untouched; --overwrite does not change that.
    before = (tmp_path / 'a.npz').read_bytes()
    for extra in ([], ['--overwrite']):
        line = cli.error_line(cli.run('sample.py', *args, '--seed=3', f'--out={tmp_path}/a.npz', *extra))
        assert ('a.npz exists' in line) if not extra else ('--overwrite' in line)
    assert (tmp_path / 'a.npz').read_bytes() == before
    assert 'pngs exists' in cli.error_line(cli.run('sample.py', *args, f'--out={tmp_path}/pngs'))
    assert 'one temperature' in cli.error_line(cli.run('sample.py', *args[:-1], '--temp=1.0,0.5', f'--out={tmp_path}/c'))


def test_mode_pixels_on_the_command_line_are_the_models_mode_images(run, loaded, tmp_path):
    r = cli.run('sample.py', '--mode=export', f'--ckpt={run[0]}', '--n=3', '--pixels=mode', f'--out={tmp_path}/m.npz')
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / 'm.npz') as f:
        np.testing.assert_array_equal(f['samples'], loaded.sample(3, 1.0, [0, 0], pixels='mode').numpy())
    r = cli.run('sample.py', f'--ckpt={run[0]}', '--pixels=mode', '--n=3', f'--out={tmp_path}/grid.png')
    assert r.returncode == 0 and os.path.isfile(tmp_path / 'grid.png'), r.stderr[-2000:]
    assert '--pixels means nothing' in cli.error_line(cli.run('sample.py', f'--ckpt={run[0]}', '--mode=stats', '--pixels=mode'))
