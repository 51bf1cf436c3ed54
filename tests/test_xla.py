"""XLA, the stand-in here for a TPU (which compiles everything strategy.run runs): the train
step (several per call, one skipped), the eval steps and the sampler compile with
jit_compile=True on the CPU and give the numbers the ordinary graphs give.

XLA's stateless random generators give other numbers than TF's kernels for the same seed (a
compiled run draws its own noise), so the comparisons swap the model's three random functions,
model._split_seed, _normal and _uniform, for integer hashes that both compute bit for bit. What
is left to differ is float rounding: XLA fuses and reorders element-wise arithmetic."""
import numpy as np
import pytest
import tensorflow as tf

import devices
import hparams
import model as vdvae
import sampling
import steps
from test_train import _batch, _snapshot

pytestmark = pytest.mark.smoke        # what a TPU needs, so also run under TF 2.20 (.ci/run)


def _hash_uniform(shape, seed):
    """Uniform in [1e-5, 1 - 1e-5) from an integer hash of (position, seed): integer ops only,
    so XLA and TF agree to the bit."""
    n = tf.reduce_prod(shape)
    s = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), 65521), tf.int32)
    h = tf.range(n, dtype=tf.int32) * 747796405 + s[0] * 1103515245 + s[1] * 12345
    for multiplier, shift in ((1274126177, 16), (1911520717, 13), (2024237689, 15)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, shift)) * multiplier
    u = tf.cast(tf.bitwise.bitwise_and(h, 0xFFFFFF), tf.float32) / 2. ** 24
    return tf.reshape(tf.clip_by_value(u, 1e-5, 1. - 1e-5), shape)


def _hash_normal(shape, seed, rows=None):
    """Unit-variance noise with the row semantics of model._normal."""
    if rows is None:
        return (_hash_uniform(shape, seed) - 0.5) * 12. ** 0.5
    return vdvae._rows_of(_hash_normal, shape, seed, rows)


def _hash_split(seed, n):
    """n seeds (n, 2) from one, by integer arithmetic."""
    s = tf.cast(seed, tf.int64)
    i = tf.range(n, dtype=tf.int64)
    a = tf.math.floormod(s[0] * 1000003 + s[1] * 7919 + i * 104729 + 1, 2147483647)
    return tf.stack([a, tf.math.floormod(a * 48271 + 11, 2147483647)], axis=1)


@pytest.fixture
def same_noise(monkeypatch):
    monkeypatch.setattr(vdvae, '_normal', _hash_normal)
    monkeypatch.setattr(vdvae, '_uniform', _hash_uniform)
    monkeypatch.setattr(vdvae, '_split_seed', _hash_split)


@pytest.fixture
def full_precision():
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    yield
    tf.config.experimental.enable_tensor_float_32_execution(before)


def _train_run(hp, batches, calls, jit_compile):
    import keras
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    state = steps.create_state(hp, strategy)
    loop = steps.make_train_loop(state, hp, strategy, jit_compile=jit_compile)
    x, t = (np.concatenate(parts) for parts in zip(*batches))
    it = iter(tf.data.Dataset.from_tensor_slices((x, t)).batch(len(batches[0][0])))
    outs = [{k: float(v) for k, v in loop(it, tf.constant(n)).items()} for n in calls]
    return state, loop, outs


def test_train_steps_compile_as_xla_and_match_the_graph(same_noise):
    """Four updates, the third skipped (a NaN image): one at a time without XLA, and in two
    calls of two with XLA. The same counters, call means and largest gradient norms to 1e-5
    (the rate, a small difference of KL terms, to 1e-7 nats/dim), and weights, EMA and Adam state to 5e-6 (the rounding of two graphs through three AdamW
    steps at lr 1e-3, 9e-7 when measured; 5e-6 is 0.5% of one step)."""
    hp = hparams.load('tiny', warmup_iters=2)
    batches = [_batch(seed=i) for i in range(4)]
    batches[2][0][3] = np.nan
    plain, _, one = _train_run(hp, batches, (1, 1, 1, 1), jit_compile=False)
    xla, loop, two = _train_run(hp, batches, (2, 2), jit_compile=True)
    for state in (plain, xla):
        assert int(state.step.numpy()) == 4 and int(state.skipped.numpy()) == 1
        assert int(state.optimizer.iterations.numpy()) == 3
    assert [o['skipped'] for o in one] == [0, 0, 1, 0] and [o['skipped'] for o in two] == [0, 1]
    for k in ('elbo', 'distortion', 'rate', 'grad_norm'):
        assert two[0][k] == pytest.approx((one[0][k] + one[1][k]) / 2, rel=1e-5, abs=1e-7), k
        assert two[1][k] == pytest.approx(one[3][k], rel=1e-5, abs=1e-7), k
    assert two[0]['grad_norm_max'] == pytest.approx(max(one[0]['grad_norm'], one[1]['grad_norm']), rel=1e-5)
    a, b = _snapshot(plain), _snapshot(xla)
    for kind in a:
        assert len(a[kind]) == len(b[kind]) > 10
        for u, v in zip(a[kind], b[kind]):
            np.testing.assert_allclose(u, v, atol=5e-6, rtol=1e-4, err_msg=kind)
    # It is one XLA program: the skip is an HLO conditional inside it, with the update.
    x_in, target = batches[0]
    hlo = loop.replica_step.experimental_get_compiler_ir(x_in, target)(stage='hlo')
    assert 'conditional(' in hlo and hlo.count(' convolution(') > 50


def test_eval_steps_compile_as_xla_and_match_the_graph(same_noise, tiny_model):
    """The ELBO and importance-weighted eval steps: the same sums to 1e-5, padding and a NaN
    image left out alike."""
    hp, strategy = tiny_model.hp, tf.distribute.get_strategy()
    x_in, target = _batch(seed=5)
    x_in[1] = np.nan
    mask = np.array([1.] * 6 + [0.] * 2, np.float32)
    for make in (lambda jit: steps.make_eval_step(tiny_model, hp, strategy, jit),
                 lambda jit: steps.make_iw_eval_step(tiny_model, hp, strategy, 4, jit)):
        plain, xla = ({k: float(v) for k, v in make(jit)(x_in, target, mask, batch=3).items()}
                      for jit in (False, True))
        hlo = make(True).replica_step.experimental_get_compiler_ir(x_in, target, mask, tf.constant(3))(stage='hlo')
        assert hlo.count(' convolution(') > 20
        assert plain['images'] == xla['images'] == 5 and plain['nonfinite'] == xla['nonfinite'] == 1
        for k in plain:
            assert xla[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-7), k


def test_the_sampler_compiles_as_xla_and_draws_the_same_images(same_noise, tiny_model):
    """The same images from the XLA sampler (prior path and DMoL draw): a pixel may differ by
    one level where a value lies within rounding of a bin edge (uint8 truncates)."""
    samplers = [sampling.make_sampler(tiny_model, jit_compile=jit) for jit in (False, True)]
    plain, xla = (f(16, [0.9] * tiny_model.num_layers, [3, 4]).numpy().astype(int) for f in samplers)
    xla_graph = samplers[1].graph.get_concrete_function(16, tf.TensorSpec([tiny_model.num_layers]),
                                                        tf.TensorSpec([2], tf.int32))
    assert xla_graph.function_def.attr['_XlaMustCompile'].b     # one XLA program
    assert plain.std() > 10                        # real images, not a constant
    assert np.abs(plain - xla).max() <= 1 and np.mean(plain != xla) < 1e-3


def test_xla_noise_is_reproducible_standard_normal_and_sliced_by_replica():
    """Without the swap: XLA's own draws are the same for the same seed, standard normal, split
    seeds distinct, and a replica's rows (its offset a tensor, as a TPU replica id is) are those rows of the whole."""
    f = tf.function(lambda seed, offset: (vdvae._normal(tf.constant([64, 8, 8, 4]), seed),
                                          vdvae._normal(tf.constant([16, 8, 8, 4]), seed, rows=(offset, 64))),
                    jit_compile=True, autograph=False)
    whole, part = f(tf.constant([7, 8]), tf.constant(32))
    again, _ = f(tf.constant([7, 8]), tf.constant(0))
    np.testing.assert_array_equal(whole, again)
    np.testing.assert_array_equal(part, whole[32:48])
    seeds = tf.function(lambda s: vdvae._split_seed(s, 10), jit_compile=True)(tf.constant([0, -2]))
    assert len(np.unique(seeds.numpy(), axis=0)) == 10
    assert abs(float(tf.reduce_mean(whole))) < 0.05 and abs(float(tf.math.reduce_std(whole)) - 1) < 0.05


@pytest.mark.parametrize('precision', ['highest', 'default'])
def test_conv_precision_sets_every_convolution_of_the_train_step(precision, full_precision):
    """--conv_precision=highest makes XLA keep float32 convolutions in full float32 (what a TPU
    would otherwise run as bfloat16 passes): every convolution of the compiled train step is
    marked operand_precision=highest; with 'default', none is."""
    hp, strategy = hparams.load('tiny'), tf.distribute.get_strategy()
    devices.set_conv_precision(precision)
    state = steps.create_state(hp, strategy)
    loop = steps.make_train_loop(state, hp, strategy, jit_compile=True)
    hlo = loop.replica_step.experimental_get_compiler_ir(*_batch())(stage='hlo')
    convs = [l for l in hlo.splitlines() if ' convolution(' in l]
    marked = [l for l in convs if 'operand_precision={highest,highest}' in l]
    assert len(convs) > 50 and len(marked) == (len(convs) if precision == 'highest' else 0)


@pytest.fixture
def bfloat16_policy():
    import keras
    keras.config.set_dtype_policy('mixed_bfloat16')
    yield
    keras.config.set_dtype_policy('float32')


def test_the_bfloat16_train_step_compiles_as_xla(bfloat16_policy, same_noise):
    """--precision=mixed_bfloat16, what a TPU runs fastest: the compiled step computes its
    convolutions in bfloat16 (variables, likelihood and KL stay float32) and its first ELBO is
    within 1% of the float32 graph's for the same weights and noise."""
    import keras
    hp = hparams.load('tiny', warmup_iters=2)
    batches = [_batch(seed=i) for i in range(2)]
    state, loop, outs = _train_run(hp, batches, (1, 1), jit_compile=True)
    assert all(np.isfinite(o['elbo']) and o['skipped'] == 0 for o in outs)
    assert all(v.dtype == 'float32' for v in state.model.weights)
    hlo = loop.replica_step.experimental_get_compiler_ir(*batches[0])(stage='hlo')
    assert ' = bf16[' in hlo and ' convolution(bf16[' in hlo
    keras.config.set_dtype_policy('float32')
    _, _, reference = _train_run(hp, batches, (1,), jit_compile=False)
    assert outs[0]['elbo'] == pytest.approx(reference[0]['elbo'], rel=1e-2)
