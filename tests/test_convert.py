"""convert.py: official PyTorch checkpoints in and out of run folders, bit for bit, without
torch; the file format checked against torch itself where torch is installed.

The official layout is written out here a second time from the spec's description (its
"Official checkpoint format" section), not taken from official.py's official_layout, so the two
check each other; the genuine official file of tests/data/official_case checks both."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import cli
import convert
import errors
import official
import hparams
from hparams import parse_blocks
import model as vdvae

ARCHITECTURE = ('width', 'zdim', 'bottleneck_multiple', 'num_mixtures', 'no_bias_above',
                'enc_blocks', 'dec_blocks', 'custom_width_str', 'image_size', 'low_bit')
# Stages of different widths, 1x1 convs at resolutions <= 2, bias states only up to 4.
CONFIGS = {'tiny': {}, 'custom': dict(width=16, custom_width_str='8:32,4:32,1:32', no_bias_above=4)}


# ---------------------------------------------------------------------------------------
# The official layout, from the spec.


def spec_shapes(hp):
    """{official key: shape} in torch's state_dict order (a module's own parameters before
    its children's: decoder.gain and decoder.bias come before the decoder blocks)."""
    w = hparams.widths(hp)
    shapes = {'encoder.in_conv.weight': (hp.width, 3, 3, 3), 'encoder.in_conv.bias': (hp.width,)}

    def block(key, c_in, c_out, res):
        mid, k = int(w[res] * hp.bottleneck_multiple), 3 if res > 2 else 1
        for i, (out, inp, ks) in enumerate([(mid, c_in, 1), (mid, mid, k), (mid, mid, k), (c_out, mid, 1)], 1):
            shapes[f'{key}.c{i}.weight'], shapes[f'{key}.c{i}.bias'] = (out, inp, ks, ks), (out,)

    for i, (res, _) in enumerate(parse_blocks(hp.enc_blocks)):
        block(f'encoder.enc_blocks.{i}', w[res], w[res], res)
    shapes['decoder.gain'] = shapes['decoder.bias'] = (1, hp.width, 1, 1)
    for i, (res, _) in enumerate(parse_blocks(hp.dec_blocks)):
        key = f'decoder.dec_blocks.{i}'
        block(f'{key}.enc', 2 * w[res], 2 * hp.zdim, res)
        block(f'{key}.prior', w[res], 2 * hp.zdim + w[res], res)
        shapes[f'{key}.z_proj.weight'], shapes[f'{key}.z_proj.bias'] = (w[res], hp.zdim, 1, 1), (w[res],)
        block(f'{key}.resnet', w[res], w[res], res)
    stateful = sorted({res for res, _ in parse_blocks(hp.dec_blocks) if res <= hp.no_bias_above})
    for k, res in enumerate(stateful):
        shapes[f'decoder.bias_xs.{k}'] = (1, w[res], res, res)
    shapes['decoder.out_net.out_conv.weight'] = (10 * hp.num_mixtures, hp.width, 1, 1)
    shapes['decoder.out_net.out_conv.bias'] = (10 * hp.num_mixtures,)
    return shapes


def official_view(m, arrays):
    """Our weights or their gradients, {variable path: array}, as the official tensors:
    NCHW, conv kernels (out, in, kh, kw); block i of a string is the next row of its stage."""
    oihw = lambda k: np.transpose(k, (3, 2, 0, 1))
    enc, dec = m.encoder, m.decoder
    out = {'encoder.in_conv.weight': oihw(arrays[enc.in_kernel.path]),
           'encoder.in_conv.bias': arrays[enc.in_bias.path],
           'decoder.gain': arrays[dec.gain.path].reshape(1, -1, 1, 1),
           'decoder.bias': arrays[dec.bias.path].reshape(1, -1, 1, 1),
           'decoder.out_net.out_conv.weight': oihw(arrays[dec.out_kernel.path]),
           'decoder.out_net.out_conv.bias': arrays[dec.out_bias.path]}

    def piece(stage, j, name):
        i = stage.index[name]
        start = sum(stage.sizes[:i])
        return arrays[stage.params.path][j, start:start + stage.sizes[i]].reshape(stage.pieces[i][1])

    def block(key, stage, j, role):
        for c in range(1, 5):
            out[f'{key}.c{c}.weight'] = oihw(piece(stage, j, f'{role}c{c}_kernel'))
            out[f'{key}.c{c}.bias'] = piece(stage, j, f'{role}c{c}_bias')

    rows = {}
    for i, (res, _) in enumerate(parse_blocks(m.hp.enc_blocks)):
        rows[res] = j = rows.get(res, -1) + 1
        block(f'encoder.enc_blocks.{i}', enc.stages[res], j, '')
    rows = {}
    for i, (res, _) in enumerate(parse_blocks(m.hp.dec_blocks)):
        rows[res] = j = rows.get(res, -1) + 1
        key, stage = f'decoder.dec_blocks.{i}', dec.stages[res]
        block(f'{key}.enc', stage, j, 'posterior/')
        block(f'{key}.prior', stage, j, 'prior/')
        block(f'{key}.resnet', stage, j, 'resnet/')
        out[f'{key}.z_proj.weight'] = oihw(piece(stage, j, 'z_proj/kernel'))
        out[f'{key}.z_proj.bias'] = piece(stage, j, 'z_proj/bias')
    for k, res in enumerate(sorted(dec.bias_states)):
        out[f'decoder.bias_xs.{k}'] = np.transpose(arrays[dec.bias_states[res].path], (0, 3, 1, 2))
    return out


def _weights(m):
    return {v.path: v.numpy() for v in m.weights}


def _random_state_dict(hp, seed):
    """Every tensor random and non-zero (a zero would hide a tensor that went nowhere)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.choice([-1, 1], s) * rng.uniform(0.02, 0.1, s)).astype(np.float32)
            for k, s in spec_shapes(hp).items()}


def _case(official_data):
    """The official case's architecture on the tiny preset's offline dataset (its own,
    cifar10, needs a download; the checkpoint only fixes the architecture)."""
    case = os.path.join(official_data, 'official_case')
    cfg = json.load(open(os.path.join(case, 'hparams.json')))
    return hparams.load('tiny', **{k: cfg[k] for k in ARCHITECTURE}), os.path.join(case, 'official.th')


def test_the_spec_layout_is_the_genuine_official_files_and_convert_uses_it(official_data):
    hp, path = _case(official_data)
    released = official.read_state_dict(path)
    assert [(k, v.shape) for k, v in released.items()] == list(spec_shapes(hp).items())
    assert [row[0] for row in official.official_layout(vdvae.VDVAE(hp))] == list(released)


# ---------------------------------------------------------------------------------------
# Torch-free: our export, our writer and our reader.


@pytest.mark.parametrize('config', list(CONFIGS))
def test_export_write_read_import_is_exact_for_every_variable(config, tmp_path):
    hp = hparams.load('tiny', **CONFIGS[config])
    source, target = vdvae.VDVAE(hp), vdvae.VDVAE(hp)
    official.load_official(source, _random_state_dict(hp, 1))
    exported = official.export_official(source)
    assert list(exported) == list(spec_shapes(hp)) == [row[0] for row in official.official_layout(source)]
    expected = official_view(source, _weights(source))
    for key, shape in spec_shapes(hp).items():
        assert exported[key].dtype == np.float32 and exported[key].shape == shape, key
        np.testing.assert_array_equal(exported[key], expected[key], err_msg=key)
    official.write_state_dict(exported, str(tmp_path / 'out.th'))
    back = official.read_state_dict(str(tmp_path / 'out.th'))
    assert list(back) == list(exported)
    official.load_official(target, back)      # a fresh model: different random weights before
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    with pytest.raises(errors.CheckpointError, match='exists; not overwriting'):
        official.write_state_dict(exported, str(tmp_path / 'out.th'))


def test_every_imported_tensor_reaches_the_output():
    hp = hparams.load('tiny')
    m = vdvae.VDVAE(hp)
    state_dict = _random_state_dict(hp, 2)
    official.load_official(m, state_dict)
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(m.losses_per_image(x / 64. - 2., x / 127.5 - 1., seed=[0, 1])['elbo'])
    grads = official_view(m, {v.path: g.numpy() for v, g in zip(m.weights, tape.gradient(loss, m.weights))})
    assert set(grads) == set(state_dict)
    unused = [k for k, g in grads.items() if not np.any(g != 0)]
    assert not unused, f'no gradient reaches {unused}'


@pytest.mark.parametrize('variant', [dict(unpool='learned'), dict(top_down_block='ffn')])
def test_figure_5_variants_are_refused_both_ways_the_official_code_has_neither(variant):
    m = vdvae.VDVAE(hparams.load('tiny', **variant))
    for convert_it in (lambda: official.load_official(m, _random_state_dict(hparams.load('tiny'), 0)),
                       lambda: official.export_official(m)):
        with pytest.raises(errors.CheckpointError, match='figure-5 variant the official code does not have'):
            convert_it()


def test_load_refuses_missing_extra_and_misshapen_tensors_by_name(official_data):
    hp, path = _case(official_data)
    good, m = official.read_state_dict(path), vdvae.VDVAE(hp)
    missing = {k: v for k, v in good.items() if k != 'decoder.dec_blocks.3.prior.c2.bias'}
    with pytest.raises(errors.CheckpointError, match=r'missing decoder\.dec_blocks\.3\.prior\.c2\.bias$'):
        official.load_official(m, missing)
    with pytest.raises(errors.CheckpointError, match=r'unexpected decoder\.extra$'):
        official.load_official(m, dict(good, **{'decoder.extra': good['decoder.gain']}))
    for shape in [(32, 4, 1), (33, 4, 1, 1)]:
        bad = dict(good, **{'decoder.dec_blocks.5.z_proj.weight': np.zeros(shape, np.float32)})
        with pytest.raises(errors.CheckpointError, match=r'z_proj\.weight has shape .* need \(32, 4, 1, 1\)'):
            official.load_official(m, bad)


# ---------------------------------------------------------------------------------------
# The command line and the run folders it makes.


def _hparams_flags(hp):
    return ['--hparams=tiny'] + [f'--{k}={str(getattr(hp, k)).lower() if k == "low_bit" else getattr(hp, k)}'
                                 for k in ARCHITECTURE]


@pytest.fixture(scope='module')
def imported(official_data, tmp_path_factory):
    hp, path = _case(official_data)
    folder = str(tmp_path_factory.mktemp('imported') / 'run')
    r = cli.run('convert.py', f'--torch_ckpt={path}', f'--out={folder}', *_hparams_flags(hp))
    assert r.returncode == 0, r.stderr[-2000:]
    return folder, hp, path, r.stdout


@pytest.mark.smoke
def test_import_writes_a_run_folder_holding_the_official_weights(imported):
    folder, hp, path, stdout = imported
    assert f'350 tensors, {vdvae.count_params(vdvae.VDVAE(hp)):,} parameters' in stdout
    assert json.load(open(os.path.join(folder, 'hparams.json'))) == dataclasses.asdict(hp)
    direct = vdvae.VDVAE(hp)
    official.load_official(direct, official.read_state_dict(path))
    ema, _, _, ckpt, step = checkpoints.load(folder)
    raw = checkpoints.load(folder, which='weights')[0]
    assert ckpt == os.path.join(folder, 'ckpt', 'ckpt-0') and step == 0
    for a, b, c in zip(direct.weights, ema.weights, raw.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=a.path)
        np.testing.assert_array_equal(c.numpy(), a.numpy(), err_msg=a.path)


@pytest.mark.smoke
def test_sample_and_test_eval_load_the_imported_run(imported, tmp_path):
    folder = imported[0]
    r = cli.run('sample.py', f'--ckpt={folder}', '--n=4', f'--out={tmp_path / "s.png"}')
    assert r.returncode == 0 and os.path.exists(tmp_path / 's.png'), r.stderr[-2000:]
    r = cli.run('train.py', '--test_eval', f'--ckpt={folder}')
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith('test mnist5k:')]
    assert line and 'over 500 images (EMA weights, step 0' in line[0], r.stdout
    bits = float(line[0].split(' = ')[1].split()[0])
    assert 0 < bits < 8


@pytest.mark.smoke
def test_export_gives_back_the_official_file_bit_for_bit(imported, tmp_path):
    folder, _, path, _ = imported
    out = str(tmp_path / 'exported.th')
    r = cli.run('convert.py', '--export', f'--ckpt={folder}', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'wrote {out}' in r.stdout and '350 tensors' in r.stdout
    released, exported = official.read_state_dict(path), official.read_state_dict(out)
    assert list(exported) == list(released)
    for key in released:
        assert exported[key].dtype == released[key].dtype, key
        np.testing.assert_array_equal(exported[key], released[key], err_msg=key)
    before = os.path.getmtime(out)
    r = cli.run('convert.py', '--export', f'--ckpt={folder}', f'--out={out}')
    assert 'exists; not overwriting' in cli.error_line(r)
    assert os.path.getmtime(out) == before


def test_import_refuses_a_folder_that_holds_a_checkpoint(imported):
    folder, hp, path, _ = imported
    r = cli.run('convert.py', f'--torch_ckpt={path}', f'--out={folder}', *_hparams_flags(hp))
    assert 'already holds a checkpoint' in cli.error_line(r)
    assert sorted(os.listdir(os.path.join(folder, 'ckpt'))) == [
        'checkpoint', 'ckpt-0.data-00000-of-00001', 'ckpt-0.index']


@pytest.mark.parametrize('fault, key', [
    ('missing', 'decoder.dec_blocks.3.prior.c2.bias'),
    ('extra', 'decoder.dec_blocks.9.extra.weight'),
    ('shape', 'decoder.dec_blocks.5.z_proj.weight')])
def test_import_cli_names_the_key_of_a_checkpoint_that_does_not_fit(official_data, tmp_path, fault, key):
    hp, path = _case(official_data)
    state_dict = official.read_state_dict(path)
    if fault == 'missing':
        del state_dict[key]
    elif fault == 'extra':
        state_dict[key] = state_dict['decoder.dec_blocks.9.z_proj.weight']
    else:
        state_dict[key] = state_dict[key].reshape(16, 8, 1, 1)
    bad = str(tmp_path / 'bad.th')
    official.write_state_dict(state_dict, bad)
    r = cli.run('convert.py', f'--torch_ckpt={bad}', f'--out={tmp_path / "run"}', *_hparams_flags(hp))
    line = cli.error_line(r)
    assert line.startswith(f'error: {bad}: ') and key in line, line
    assert not os.path.exists(tmp_path / 'run')


def test_the_model_file_gives_the_weights_to_train_on_and_export_can_write_them(official_data, tmp_path):
    hp, path = _case(official_data)
    raw_dict = {k: v + np.float32(0.5) for k, v in official.read_state_dict(path).items()}
    raw_path, folder = str(tmp_path / 'raw.th'), str(tmp_path / 'run')
    official.write_state_dict(raw_dict, raw_path)
    ckpt, tensors, _ = convert.import_run(hp, folder, path, raw_path)
    assert tensors == 350 and ckpt.endswith('ckpt-0')
    assert _same(official.export_official(checkpoints.load(folder)[0]), official.read_state_dict(path))
    assert _same(official.export_official(checkpoints.load(folder, which='weights')[0]), raw_dict)
    out = str(tmp_path / 'raw-again.th')
    r = cli.run('convert.py', '--export', '--weights=model', f'--ckpt={ckpt}', f'--out={out}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same(official.read_state_dict(out), raw_dict)


def _same(a, b):
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# Against torch itself.


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_a_state_dict_saved_by_torch_imports_exactly(prefix, tmp_path):
    torch = pytest.importorskip('torch')
    hp = hparams.load('tiny')
    arrays = _random_state_dict(hp, 3)
    tensors = {}
    for key, a in arrays.items():
        t = torch.from_numpy(a)
        if a.ndim == 4:     # a non-contiguous view: the reader must follow strides
            t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 3, 1, 0))).permute(3, 2, 0, 1)
        tensors[prefix + key] = t
    # Biases as views into one shared storage, at offsets.
    biases = [k for k in arrays if k.endswith('.bias') and arrays[k].ndim == 1]
    shared = torch.from_numpy(np.concatenate([arrays[k] for k in biases]))
    offsets = np.cumsum([0] + [arrays[k].size for k in biases])
    for k, start, end in zip(biases, offsets, offsets[1:]):
        tensors[prefix + k] = shared[start:end]
    torch.save(tensors, str(tmp_path / 'torch.th'))
    m = vdvae.VDVAE(hp)
    official.load_official(m, official.read_state_dict(str(tmp_path / 'torch.th')))
    ours = official_view(m, _weights(m))
    assert set(ours) == set(arrays)
    for key, t in tensors.items():
        np.testing.assert_array_equal(ours[key[len(prefix):]], t.numpy(), err_msg=key)


def test_torch_load_reads_our_export_exactly(tmp_path):
    torch = pytest.importorskip('torch')
    hp = hparams.load('tiny', **CONFIGS['custom'])
    m = vdvae.VDVAE(hp)
    official.load_official(m, _random_state_dict(hp, 4))
    path = str(tmp_path / 'ours.th')
    official.write_state_dict(official.export_official(m), path)
    expected = official_view(m, _weights(m))
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded) == list(spec_shapes(hp))
        for key, t in loaded.items():
            assert t.dtype == torch.float32 and tuple(t.shape) == spec_shapes(hp)[key] and t.is_contiguous(), key
            np.testing.assert_array_equal(t.numpy(), expected[key], err_msg=key)
