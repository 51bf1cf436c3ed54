"""The architecture: exact parameter counts, the public API, and a trainable graph."""
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import fit
import fastgraph
import hparams
import likelihood
import model
import update

OFFICIAL_COUNTS = dict(cifar10=39_145_700, imagenet32=119_280_868, imagenet64=125_005_860,
                       ffhq256=114_874_852, ffhq1024=109_366_904)


@pytest.mark.parametrize('preset', list(OFFICIAL_COUNTS))
def test_parameter_count_equals_the_official_model(preset):
    m = model.VDVAE(hparams.load(preset))
    assert model.count_params(m) == OFFICIAL_COUNTS[preset]
    # One variable per resolution stage keeps the graph small whatever the depth:
    # the stages plus in_conv, bias states, gain, bias and the output head.
    stages = len(m.decoder.stages) + len(m.encoder.stages)
    assert len(m.trainable_variables) == stages + 2 + len(m.decoder.bias_states) + 4


def _batch(hp, n=4, seed=0):
    rng = np.random.default_rng(seed)
    size = hp.image_size
    # Smooth blobs, not noise: something a tiny model can learn in a few dozen steps.
    yy, xx = np.mgrid[:size, :size] / size
    imgs = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))
        imgs.append(np.stack([blob * rng.uniform(100, 255) for _ in range(3)], -1))
    x = np.clip(np.array(imgs), 0, 255).astype(np.uint8)
    return ((x - 120.63838) / 64.16736).astype(np.float32), (x / 127.5 - 1.).astype(np.float32)


@pytest.mark.smoke
def test_losses_are_finite_with_finite_gradients_for_every_variable(tiny_model):
    x_in, target = _batch(tiny_model.hp)
    with tf.GradientTape() as tape:
        out = tiny_model.losses_per_image(x_in, target, seed=[1, 2])
        loss = tf.reduce_mean(out['elbo'])
    for k in ('elbo', 'distortion', 'rate'):
        assert out[k].shape == (4,) and np.all(np.isfinite(out[k]))
    np.testing.assert_allclose(out['elbo'], out['distortion'] + out['rate'], rtol=1e-6)
    assert np.all(out['rate'].numpy() >= 0)
    grads = dict(zip([v.path for v in tiny_model.trainable_variables],
                     tape.gradient(loss, tiny_model.trainable_variables)))
    for path, g in grads.items():
        assert g is not None and np.all(np.isfinite(g)), path
        if 'dec' not in path:
            assert np.any(g.numpy() != 0), f'{path} gets no gradient'
    # Per piece of the stacked decoder weights. At initialisation the zero last prior conv
    # passes no gradient back to the prior's other convs, and the first layer's prior reads
    # the all-zero initial state, so its last kernel sees zero inputs. Every other piece,
    # zero-initialised ones included, must get a gradient.
    first_stage = tiny_model.decoder.blocks[0].res
    for res, stage in tiny_model.decoder.stages.items():
        g = grads[stage.params.path].numpy()
        for (name, _, _), size, start in zip(stage.pieces, stage.sizes, np.cumsum([0] + stage.sizes)):
            if name.startswith('prior/c') and not name.startswith('prior/c4'):
                continue
            if name == 'prior/c4_kernel' and res == first_stage:
                continue
            assert np.any(g[:, start:start + size] != 0), f'dec{res} {name} gets no gradient'


def test_zero_initialised_prior_and_scaled_inits(tiny_model):
    d = tiny_model.decoder
    for stage in d.stages.values():
        assert not np.any(stage.piece('prior/c4_kernel'))
        z_kernel = np.abs(stage.piece('z_proj/kernel'))
        bound = math.sqrt(1 / len(d.blocks)) / math.sqrt(tiny_model.hp.zdim)
        assert bound * 0.8 < z_kernel.max() <= bound
        c2 = np.abs(stage.piece('posterior/c2_kernel'))
        fan_in = np.prod(c2.shape[1:4])
        assert 1 / math.sqrt(fan_in) * 0.8 < c2.max() <= 1 / math.sqrt(fan_in)
        for name, _, _ in stage.pieces:
            if name.endswith('bias'):
                assert not np.any(stage.piece(name)), name
    for v in tiny_model.weights:
        if v.path.endswith('bias') or 'bias_state' in v.path:
            assert not np.any(v.numpy()), v.path
    assert np.all(d.gain.numpy() == 1)


def test_the_elbo_decreases_when_training_on_a_fixed_batch():
    keras.utils.set_random_seed(0)
    m = model.VDVAE(hparams.load('tiny'))
    x_in, target = _batch(m.hp, n=8, seed=1)
    losses = fit(m, x_in, target, 40)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_posterior_latents_have_one_tensor_per_layer_in_order(tiny_model):
    x_in, _ = _batch(tiny_model.hp, n=3)
    zs = tiny_model.posterior_latents(x_in, seed=[0, 1])
    blocks = hparams.parse_blocks(tiny_model.hp.dec_blocks)
    assert tiny_model.num_layers == len(blocks) == len(zs)
    assert [z.shape for z in zs] == [(3, r, r, tiny_model.hp.zdim) for r, _ in blocks]


def test_decoding_the_full_posterior_latents_reproduces_the_training_path(tiny_model):
    x_in, _ = _batch(tiny_model.hp, n=3)
    acts = tiny_model.encoder.activations(x_in)
    params, layers = tiny_model.decoder.top_down(3, acts=acts, seed=[4, 5])
    again = tiny_model.decode([l['z'] for l in layers], temperature=0.3, seed=[9, 9])
    np.testing.assert_array_equal(again.numpy(), params.numpy())


def test_decoding_some_latents_keeps_them_and_draws_the_rest(tiny_model):
    x_in, _ = _batch(tiny_model.hp, n=2)
    zs = tiny_model.posterior_latents(x_in, seed=[0, 1])
    a = tiny_model.decode(zs[:3], temperature=1., seed=[1, 1]).numpy()
    b = tiny_model.decode(zs[:3], temperature=1., seed=[2, 2]).numpy()
    assert not np.allclose(a, b)          # the rest come from the prior
    images = tiny_model.decode_images(zs[:3], temperature=0.5, seed=[3, 3]).numpy()
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_temperature_zero_is_deterministic_given_the_bias_states(tiny_model):
    for v in tiny_model.decoder.bias_states.values():     # non-trivial initial states
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype(np.float32))
    saved = {r: s.params.numpy() for r, s in tiny_model.decoder.stages.items()}
    for stage in tiny_model.decoder.stages.values():      # a prior that is not N(0, 1)
        stage.params.assign(saved_noise(stage.params.shape))
    try:
        cold = [tiny_model.decode([], n=2, temperature=0., seed=[s, 0]).numpy() for s in (1, 2)]
        np.testing.assert_array_equal(cold[0], cold[1])
        warm = [tiny_model.decode([], n=2, temperature=1., seed=[s, 0]).numpy() for s in (1, 2)]
        assert not np.allclose(warm[0], warm[1])
        per_layer = np.zeros(tiny_model.num_layers, np.float32)
        np.testing.assert_array_equal(tiny_model.decode([], n=2, temperature=per_layer, seed=[3, 0]), cold[0])
    finally:
        for v in tiny_model.decoder.bias_states.values():
            v.assign(np.zeros(v.shape, np.float32))
        for r, stage in tiny_model.decoder.stages.items():
            stage.params.assign(saved[r])


def saved_noise(shape):
    return np.random.default_rng(1).normal(scale=0.05, size=shape).astype(np.float32)


def test_sample_returns_images_and_refuses_a_wrong_schedule(tiny_model):
    images = tiny_model.sample(5, temperature=0.7, seed=[1, 2])
    assert images.shape == (5, 16, 16, 3) and images.dtype == tf.uint8
    assert np.array_equal(images.numpy(), tiny_model.sample(5, temperature=0.7, seed=[1, 2]).numpy())
    with pytest.raises(ValueError, match='schedule has 3 values; the decoder has 10 layers'):
        tiny_model.sample(2, temperature=[1., 1., 1.])


def test_rate_per_layer_sums_to_the_rate(tiny_model):
    x_in, target = _batch(tiny_model.hp, n=3)
    per_layer = tiny_model.rate_per_layer(x_in, seed=[5, 6]).numpy()
    assert per_layer.shape == (3, tiny_model.num_layers) and np.all(per_layer >= 0)
    rate = tiny_model.losses_per_image(x_in, target, seed=[5, 6])['rate'].numpy()
    np.testing.assert_allclose(per_layer.sum(1), rate, rtol=1e-5)


def test_custom_widths_pad_channels_and_build():
    hp = hparams.load('tiny', width=16, custom_width_str='8:32,4:32,1:32')
    m = model.VDVAE(hp)
    x_in, target = _batch(hp, n=2)
    acts = m.encoder.activations(x_in)
    assert {r: a.shape[-1] for r, a in acts.items()} == {16: 16, 8: 32, 4: 32, 1: 32}
    assert np.all(np.isfinite(m.losses_per_image(x_in, target)['elbo']))


@pytest.mark.smoke
def test_official_checkpoint_reproduces_the_official_outputs(official_data):
    import official
    case_dir = os.path.join(official_data, 'official_case')
    cfg = json.load(open(os.path.join(case_dir, 'hparams.json')))
    keys = ('width', 'zdim', 'bottleneck_multiple', 'num_mixtures', 'no_bias_above',
            'enc_blocks', 'dec_blocks', 'custom_width_str', 'image_size', 'low_bit')
    m = model.VDVAE(hparams.load('tiny', **{k: cfg[k] for k in keys}))
    official.load_official(m, official.read_state_dict(os.path.join(case_dir, 'official.th')))
    case = np.load(os.path.join(case_dir, 'case.npz'))
    latents = [case[f'z{i}'] for i in range(m.num_layers)]
    np.testing.assert_allclose(m.decode(latents).numpy(), case['params'], atol=1e-5)
    np.testing.assert_allclose(likelihood.dmol_nll(case['params'], case['target']).numpy(), case['nll'], rtol=1e-6)
    elbo = tf.function(lambda s: tf.reduce_mean(m.losses_per_image(case['x_in'], case['target'], seed=s)['elbo']))
    draws = np.array([float(elbo(tf.constant([i, 11]))) for i in range(64)])
    # The mean of 64 draws has standard error elbo_std / 8.
    assert abs(draws.mean() - case['elbo_mean']) < 4 * case['elbo_std'] / math.sqrt(64) + 1e-6
    assert 0.5 < draws.std() / case['elbo_std'] < 2


def _fastgraph_traces():
    """Traces of fastgraph's functions so far: one per block or sum shape kept, plus every
    trace of its module-level tf.functions."""
    module_level = [f for f in vars(fastgraph).values() if hasattr(f, 'experimental_get_tracing_count')]
    return (len(fastgraph._BLOCK_FUNCTIONS) + len(fastgraph._SUM_FUNCTIONS)
            + sum(f.experimental_get_tracing_count() for f in module_level))


def test_eager_calls_at_new_batch_sizes_neither_retrace_nor_warn():
    """A user calling the model eagerly at several batch sizes: one trace per block and sum
    shape (any batch), no other function of fastgraph traced again, and no tf.function
    retracing warning."""
    import logging
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    tf_logger, level = tf.get_logger(), tf.get_logger().level
    tf_logger.addHandler(handler)
    tf_logger.setLevel(logging.WARNING)
    try:
        m = model.VDVAE(hparams.load('tiny', width=24))         # block shapes no other test traces
        for b in (2, 3, 4, 5, 6, 7):
            x = np.random.default_rng(b).random((b, 16, 16, 3), np.float32)
            m.losses_per_image(x, x)
            m.sample(b, 0.9)
            if b == 2:
                traced = _fastgraph_traces()
        assert _fastgraph_traces() == traced
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(level)
    assert not [w for w in warnings if 'retracing' in w], warnings


# ---------------------------------------------------------------------------------------
# Figure 3 as Keras layers, and figure 5's variants of the top-down path.
def _row_of_each_block(blocks):
    """Block i reads row j of its stage: j counts the earlier blocks at its resolution."""
    seen, rows = {}, []
    for res, _ in blocks:
        rows.append(seen.get(res, 0))
        seen[res] = rows[-1] + 1
    return rows


@pytest.mark.smoke
def test_each_block_is_a_keras_layer_reading_its_row_of_the_stage(tiny_model):
    hp, enc, dec = tiny_model.hp, tiny_model.encoder, tiny_model.decoder
    enc_blocks, dec_blocks = hparams.parse_blocks(hp.enc_blocks), hparams.parse_blocks(hp.dec_blocks)
    assert [(b.res, b.down) for b in enc.blocks] == enc_blocks
    assert [(b.res, b.mixin) for b in dec.blocks] == dec_blocks
    for blocks, stages, parsed in ((enc.blocks, enc.stages, enc_blocks), (dec.blocks, dec.stages, dec_blocks)):
        for block, j, (res, _) in zip(blocks, _row_of_each_block(parsed), parsed):
            assert isinstance(block, keras.layers.Layer) and not block.weights   # its weights are the stage's
            pieces = block.pieces()
            assert sorted(pieces) == sorted(stages[res].index)
            for name, value in pieces.items():
                np.testing.assert_array_equal(value, stages[res].piece(name)[j])
    assert isinstance(dec.blocks[3], model.DecBlock) and isinstance(enc.blocks[0], model.EncBlock)


def test_blocks_called_one_by_one_give_the_encoder_and_decoder_outputs(tiny_model):
    """A user's path: each block on its own, reading its own row of the stacked weights,
    composed by hand as figure 3 draws it, gives what the fast path gives."""
    x_in, _ = _batch(tiny_model.hp, n=2)
    enc, dec = tiny_model.encoder, tiny_model.decoder
    acts = enc.activations(x_in)
    x = model.conv(x_in, enc.in_kernel, enc.in_bias)
    by_hand = {tiny_model.hp.image_size: x}
    for block in enc.blocks:
        x = by_hand[block.res // (block.down or 1)] = block(x)
    assert sorted(by_hand) == sorted(acts)
    for res in acts:
        np.testing.assert_allclose(by_hand[res], acts[res], rtol=1e-6, atol=1e-6)
    params, layers = dec.top_down(2, acts=acts, seed=[4, 5])
    seeds = model._split_seed(tf.constant([4, 5]), len(dec.blocks))
    state = dec.initial_state(2)
    for i, block in enumerate(dec.blocks):
        state[block.res], layer = block(state, acts=acts[block.res], noise=lambda shape: model._normal(shape, seeds[i]))
        assert sorted(layer) == sorted(layers[i]) == ['kl', 'p', 'q', 'z']
        np.testing.assert_allclose(layer['kl'], layers[i]['kl'], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer['z'], layers[i]['z'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dec.likelihood_params(state[tiny_model.hp.image_size]), params, rtol=1e-5, atol=1e-5)


def _copy_weights(source, target):
    by_key = {update.checkpoint_key(v): v for v in source.weights}
    for v in target.weights:
        if update.checkpoint_key(v) in by_key:
            v.assign(by_key[update.checkpoint_key(v)])


def test_a_learned_unpool_sits_where_nearest_neighbours_do_and_adds_only_its_convs(tiny_model):
    hp = hparams.load('tiny', unpool='learned')
    learned = model.VDVAE(hp)
    widths = hparams.widths(hp)
    extra = sum(widths[m] * (r // m) ** 2 * widths[r] + (r // m) ** 2 * widths[r]
                for r, m in hparams.parse_blocks(hp.dec_blocks) if m)
    assert model.count_params(learned) == model.count_params(tiny_model) + extra
    # With each patch position copying the channels above, the learned unpool IS nearest
    # neighbours: same weights elsewhere, same losses.
    _copy_weights(tiny_model, learned)
    for block in learned.decoder.blocks:
        if block.unpool is not None:
            w_in, w = widths[block.mixin], block.width
            kernel = np.zeros(block.unpool.kernel.shape, np.float32)
            for k in range((block.res // block.mixin) ** 2):
                kernel[0, 0, np.arange(w), k * w + np.arange(w)] = 1.
            assert w_in >= w
            block.unpool.kernel.assign(kernel)
    x_in, target = _batch(hp, n=3)
    ours, ref = (m.losses_per_image(x_in, target, seed=[2, 3]) for m in (learned, tiny_model))
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, err_msg=k)
    # Its own random init is not an unpool of that kind, and it trains: gradients reach it.
    fresh = model.VDVAE(hp)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(fresh.losses_per_image(x_in, target, seed=[2, 3])['elbo'])
    unpool_vars = [v for v in fresh.trainable_variables if 'unpool' in v.path]
    assert len(unpool_vars) == 2 * sum(1 for _, m in hparams.parse_blocks(hp.dec_blocks) if m)
    for v, g in zip(unpool_vars, tape.gradient(loss, unpool_vars)):
        assert np.all(np.isfinite(g)) and np.any(g.numpy() != 0), v.path


def test_ffn_drops_exactly_the_residual_connection_of_the_top_down_res_block(tiny_model):
    ffn = model.VDVAE(hparams.load('tiny', top_down_block='ffn'))
    assert model.count_params(ffn) == model.count_params(tiny_model)
    _copy_weights(tiny_model, ffn)
    x_in, _ = _batch(tiny_model.hp, n=2)
    acts = tiny_model.encoder.activations(x_in)
    i = 4                                          # a block with a state of its own above
    res = tiny_model.decoder.blocks[i].res
    state = {r: tf.random.stateless_normal(s.shape, [i, r]) for r, s in tiny_model.decoder.initial_state(2).items()}
    noise = lambda shape: model._normal(shape, tf.constant([1, 1]))
    out = {name: m.decoder.blocks[i](state, acts=acts[res], noise=noise)[0].numpy()
           for name, m in (('res', tiny_model), ('ffn', ffn))}
    # With the res block's last conv zeroed its convs add nothing: the residual model passes
    # its input h = x + x_res + z_proj(z) through, the FFN gives zeros.
    stage = ffn.decoder.stages[res]
    saved = stage.params.numpy()
    j = _row_of_each_block(hparams.parse_blocks(ffn.hp.dec_blocks))[i]
    start = sum(stage.sizes[:stage.index['resnet/c4_kernel']])
    zeroed = saved.copy()
    zeroed[j, start:start + stage.sizes[stage.index['resnet/c4_kernel']] + stage.sizes[stage.index['resnet/c4_bias']]] = 0
    stage.params.assign(zeroed)
    assert not np.any(ffn.decoder.blocks[i](state, acts=acts[res], noise=noise)[0].numpy())
    tiny_model.decoder.stages[res].params.assign(zeroed)
    try:
        h = tiny_model.decoder.blocks[i](state, acts=acts[res], noise=noise)[0].numpy()
    finally:
        tiny_model.decoder.stages[res].params.assign(saved)
    assert np.any(h != 0)
    np.testing.assert_allclose(out['res'] - out['ffn'], h, rtol=1e-5, atol=1e-5)


def test_checkpoint_format_is_the_one_earlier_run_folders_hold(tiny_model):
    """Run folders written before the blocks became layers (the earliest format) hold these
    keys and shapes, and each stacked row holds its block's pieces in this order; a change
    here would leave them unreadable (or worse, read into the wrong convs)."""
    assert {update.checkpoint_key(v): tuple(v.shape) for v in tiny_model.weights} == {
        'encoder.in_kernel': (3, 3, 3, 32), 'encoder.in_bias': (32,), 'enc16.params': (3, 1720),
        'enc8.params': (3, 1720), 'enc4.params': (3, 1720), 'enc1.params': (1, 696),
        'decoder.bias_state1': (1, 1, 1, 32), 'decoder.bias_state4': (1, 4, 4, 32),
        'decoder.bias_state8': (1, 8, 8, 32), 'decoder.bias_state16': (1, 16, 16, 32), 'decoder.gain': (32,),
        'decoder.bias': (32,), 'decoder.out_kernel': (1, 1, 32, 30), 'decoder.out_bias': (30,),
        'dec1.params': (1, 2360), 'dec4.params': (3, 5432), 'dec8.params': (3, 5432), 'dec16.params': (3, 5432)}
    convs = lambda role: [f'{role}c{i}_{kind}' for i in range(1, 5) for kind in ('kernel', 'bias')]
    assert [name for name, _, _ in tiny_model.encoder.stages[8].pieces] == convs('')
    assert [name for name, _, _ in tiny_model.decoder.stages[8].pieces] == (
        convs('posterior/') + convs('prior/') + ['z_proj/kernel', 'z_proj/bias'] + convs('resnet/'))


@pytest.mark.smoke
@pytest.mark.parametrize('unpool', ['nearest', 'learned'])
def test_remat_recomputes_every_block_in_the_backward_pass_with_the_same_losses_and_gradients(unpool, monkeypatch):
    hp = hparams.load('tiny', unpool=unpool)
    keras.utils.set_random_seed(1)
    plain, remat = model.VDVAE(hp), model.VDVAE(hp, remat=True)
    for a, b in zip(plain.weights, remat.weights):
        b.assign(a)
    calls = {'enc': 0, 'dec': 0}
    for name, cls in (('enc', model.EncBlock), ('dec', model.DecBlock)):
        def counted(self, *args, _call=cls.call, _name=name, **kwargs):
            calls[_name] += 1
            return _call(self, *args, **kwargs)
        monkeypatch.setattr(cls, 'call', counted)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (3, hp.image_size, hp.image_size, 3)), tf.float32)

    def losses_and_grads(m):
        @tf.function(autograph=False)
        def run(x):
            with tf.GradientTape() as tape:
                out = m.losses_per_image(x, x, seed=[1, 2])
                loss = tf.reduce_mean(out['elbo'])
            return out, tape.gradient(loss, m.trainable_variables)
        before = dict(calls)
        out = run(x)
        return out, {k: calls[k] - before[k] for k in calls}

    (out_plain, g_plain), n_plain = losses_and_grads(plain)
    (out_remat, g_remat), n_remat = losses_and_grads(remat)
    n_enc, n_dec = len(plain.encoder.blocks), len(plain.decoder.blocks)
    assert n_plain == {'enc': n_enc, 'dec': n_dec}
    assert n_remat == {'enc': 2 * n_enc, 'dec': 2 * n_dec}     # the forward, and again in the backward pass
    for k in out_plain:
        np.testing.assert_allclose(out_remat[k], out_plain[k], rtol=1e-6)
    assert len(g_remat) == len(g_plain) == len(plain.trainable_variables)
    for v, a, b in zip(plain.trainable_variables, g_plain, g_remat):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()), err_msg=v.path)
        assert np.abs(a).max() > 0, v.path
