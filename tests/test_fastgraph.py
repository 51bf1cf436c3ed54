"""fastgraph.py, what model.py's blocks run on: the bottleneck block's custom gradient against
autodiff, bfloat16's kept GELU slopes against recomputed ones, which blocks stay calls in the
graph, the one-rounding add and the bfloat16 GELU kernels."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastgraph
import model
import update


def _block_case(dtype, split, seed):
    """A bottleneck block's input x (two tensors if split), its weights, the tensors to take
    gradients for, and weights w of a loss over its outputs."""
    rng = np.random.default_rng(seed)
    width, mid = 6, 4
    x = tf.cast(rng.normal(scale=3., size=(2, 5, 5, width)), dtype)
    if split:
        x = (x[..., :split], x[..., split:])
    shapes = [(1, 1, width, mid), (3, 3, mid, mid), (3, 3, mid, mid), (1, 1, mid, width)]
    weights = [(tf.cast(rng.normal(scale=.5, size=s), dtype), tf.cast(rng.normal(size=s[-1:]), dtype))
               for s in shapes]
    w = tf.constant(rng.normal(size=(2, 5, 5, width)), tf.float32)
    inputs = list(x) if split else [x]
    return x, weights, inputs + [t for pair in weights for t in pair], w


@pytest.mark.smoke
@pytest.mark.parametrize('residual, split', [(True, None), (False, None), (False, 4)])
def test_bottleneck_and_its_gradients_are_those_of_the_block_written_with_autodiff(residual, split):
    """fastgraph's block (GELU recomputed in its backward pass, 1x1 kernel gradients as matrix
    products, the skip's gradient added inside GELU's; split: its input given as two tensors,
    as the posterior's is, read without concatenating them) against the block in plain TF ops
    with autodiff on the concatenated input (the naive layout's block, bench.py's baseline)."""
    x, weights, sources, w = _block_case(tf.float32, split, seed=0)
    results = []
    for f in (fastgraph.bottleneck, fastgraph.naive_bottleneck):
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = f(x, weights, residual)
            loss = tf.reduce_sum(w * y)
        results.append([y] + tape.gradient(loss, sources))
    for ours, ref in zip(*results):     # float32 round-off, on the scale of each tensor
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5 * np.abs(ref.numpy()).max())


@pytest.mark.smoke
@pytest.mark.parametrize('residual, split', [(True, None), (False, 4)])
def test_a_bfloat16_block_keeping_gelus_slopes_gives_the_same_bits_as_recomputing_them(residual, split):
    """keeping_slopes() (train.py's step in bfloat16): GELU's output and float32 slope kept for
    the backward pass instead of recomputed there; outputs and gradients equal bit for bit."""
    x, weights, sources, w = _block_case(tf.bfloat16, split, seed=2)
    results = []
    for keep in (True, False):
        functions = set(fastgraph._BLOCK_FUNCTIONS)
        with tf.GradientTape() as tape, fastgraph.keeping_slopes(keep):
            tape.watch(sources)
            loss = tf.reduce_sum(w * tf.cast(fastgraph.bottleneck(x, weights, residual), tf.float32))
        results.append([loss] + tape.gradient(loss, sources))
        # the path asked for is the one taken
        assert all(key[1] == keep for key in set(fastgraph._BLOCK_FUNCTIONS) - functions)
    for kept, recomputed in zip(*results):
        np.testing.assert_array_equal(tf.cast(kept, tf.float32).numpy(), tf.cast(recomputed, tf.float32).numpy())
    assert any(key[1] for key in fastgraph._BLOCK_FUNCTIONS)


@pytest.mark.parametrize('dtype', [tf.float32, tf.bfloat16])
def test_float32_blocks_stay_calls_in_the_graph_and_16_bit_blocks_are_inlined(dtype):
    """TensorFlow inlines a traced function's calls into the caller's graph before running it,
    unless the function says _noinline: float32 blocks say it (the step's graph, instantiated
    and optimised before the first step, stays a fraction of the size, at the same steady
    speed); bfloat16 blocks do not (oneDNN's bfloat16 kernels ran slower as calls)."""
    x, weights, _, _ = _block_case(dtype, None, seed=0)
    step = tf.function(lambda x: fastgraph.bottleneck(x, weights, residual=True)).get_concrete_function(x)
    flag = lambda f, name: name in f.attr and f.attr[name].b
    library = step.graph.as_graph_def().library.function
    (block,) = [f for f in library if not flag(f, '_XlaMustCompile')]     # the rest: its XLA kernels
    assert flag(block, '_noinline') == (dtype == tf.float32)


@pytest.mark.parametrize('dtype', [tf.float32, tf.bfloat16])
def test_add_sums_in_one_rounding_and_passes_the_gradient_to_each_term(dtype):
    rng = np.random.default_rng(0)
    terms = [tf.cast(tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float32), dtype) for _ in range(3)]
    w = tf.constant(rng.normal(size=(2, 3, 3, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(terms)
        y = fastgraph.add(*terms)
        loss = tf.reduce_sum(w * tf.cast(y, tf.float32))
    exact = tf.add_n([tf.cast(t, tf.float32) for t in terms])
    assert y.dtype == dtype
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), tf.cast(tf.cast(exact, dtype), tf.float32).numpy(), rtol=1e-6)
    for grad in tape.gradient(loss, terms):
        np.testing.assert_array_equal(tf.cast(grad, tf.float32).numpy(), tf.cast(tf.cast(w, dtype), tf.float32).numpy())


def test_bfloat16_gelu_kernels_give_the_exact_gelu_to_bfloat16_precision():
    """In bfloat16 the GELU kernels compute in float32 and round their result (fastgraph: the
    fast path on CPUs); forward and backward stay within bfloat16's precision of float32's."""
    x = tf.cast(tf.constant(np.random.default_rng(0).normal(scale=3., size=(4096,)), tf.float32), tf.bfloat16)
    dy = tf.cast(tf.linspace(-2., 2., 4096), tf.bfloat16)
    exact = tf.cast(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(exact)
        y = 0.5 * exact * (1. + tf.math.erf(exact / math.sqrt(2.)))
    reference = [y, tf.cast(dy, tf.float32) * tape.gradient(y, exact)]
    for ours, ref in zip((fastgraph._gelu_forward(x), fastgraph._gelu_backward(x, dy)), reference):
        assert ours.dtype == tf.bfloat16
        np.testing.assert_allclose(tf.cast(ours, tf.float32).numpy(), ref.numpy(), rtol=2. ** -8, atol=1e-5)


def test_the_naive_layout_is_the_same_model_with_one_variable_per_conv_piece(tiny_model):
    """VDVAE(hp, layout='naive') (bench.py --layout=naive): the same parameters, one variable
    each, and given the same weights the same ELBO, through plain TF blocks."""
    keras.utils.set_random_seed(2)
    naive = model.VDVAE(tiny_model.hp, layout='naive')
    assert model.count_params(naive) == model.count_params(tiny_model)
    stacks = [(res, s) for part in (tiny_model.encoder, tiny_model.decoder) for res, s in part.stages.items()]
    assert len(naive.weights) == len(tiny_model.weights) + sum(s.n * len(s.pieces) - 1 for _, s in stacks)
    by_key = {update.checkpoint_key(v): v for v in tiny_model.weights}
    for v in naive.weights:
        if update.checkpoint_key(v) in by_key:
            v.assign(by_key[update.checkpoint_key(v)])
    for ours, theirs in ((tiny_model.encoder, naive.encoder), (tiny_model.decoder, naive.decoder)):
        for res, stack in ours.stages.items():
            for name, _, _ in stack.pieces:
                for j, v in enumerate(theirs.stages[res].per_block):
                    v[stack.index[name]].assign(stack.piece(name)[j])
    for block, naive_block in zip(tiny_model.decoder.blocks, naive.decoder.blocks):
        assert naive_block.bottleneck is fastgraph.naive_bottleneck
        for name, value in block.pieces().items():
            np.testing.assert_array_equal(naive_block.pieces()[name], value)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, size=(2, tiny_model.hp.image_size, tiny_model.hp.image_size, 3)), tf.float32)
    elbo = [m.losses_per_image(x, x, seed=[3, 4])['elbo'].numpy() for m in (tiny_model, naive)]
    np.testing.assert_allclose(elbo[1], elbo[0], rtol=1e-5)
    with pytest.raises(ValueError, match="layout='fancy'"):
        model.VDVAE(tiny_model.hp, layout='fancy')
