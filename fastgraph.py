"""What keeps the model's graph small and fast; model.py reads as the paper on top of it.

A direct port of VDVAE gives TensorFlow ~1,400 variables and ~250 copies of the same block
(cifar10 preset), and TensorFlow spends minutes tracing and optimising that graph before the
first step. Three things here change that:

- ParamStack: every resolution stage keeps all weights of all its blocks in ONE variable,
  split once per call: 21 variables instead of 1,393, so the optimizer, the EMA and the
  all-reduce touch 21 tensors.
- bottleneck(): one traced function per block shape. The step's graph holds one call per
  block instead of its ~30 ops, so tracing and differentiating ~250 blocks costs ~20 small
  traces.
- the block's own gradient: the exact (erf) GELU is one XLA-fused kernel each way, recomputed
  in the backward pass instead of stored. Written as TF ops with autodiff, GELU dominated the
  step time and the graph's nodes; recomputing it also halves the activation memory. The
  bfloat16 train step keeps GELU's output and slope instead (keeping_slopes()): there the
  recomputation costs more time than the memory is worth.

Together they trace, start and step several times faster than a direct port (the end of this
file: a model's layout='naive' swaps all three out; `python bench.py --presets=cifar10
--layout=naive` measures it, and docs/performance.md, "Stacked weights against a direct port",
holds the figures).

The layers of model.py hold references into these stacks; they own no variables of their own.

rematerialised() trades compute for memory (train.py --remat): a block keeps only its inputs
for the backward pass and computes everything else again there.
"""
import contextlib
import functools
import math
import random

import keras
import numpy as np
import tensorflow as tf


class ParamStack(keras.layers.Layer):
    """The weights of `n` same-shaped blocks in ONE variable (n, P): each row holds one
    block's named pieces (kernels, biases) flattened end to end.

    pieces: (name, shape, init_bound) with init U(+-bound), 0 meaning zeros."""

    def __init__(self, n, pieces, **kwargs):
        super().__init__(**kwargs)
        self.n, self.pieces = n, list(pieces)
        self.sizes = [int(np.prod(shape)) for _, shape, _ in self.pieces]
        self.index = {name: i for i, (name, _, _) in enumerate(self.pieces)}
        self.params = self.add_weight(shape=(n, sum(self.sizes)), initializer=self._init, name='params')
        self.built = True

    def _init(self, shape, dtype=None):
        # A seed per piece from Python's RNG, as Keras' own initializers take theirs: Keras
        # before 3.11 does not restart its global generator in set_random_seed, so unseeded
        # draws would make a second model of one process start from other weights.
        parts = [keras.random.uniform((self.n, size), -bound, bound, dtype='float32',
                                      seed=random.randint(1, 10 ** 9)) if bound
                 else tf.zeros((self.n, size)) for (_, _, bound), size in zip(self.pieces, self.sizes)]
        return tf.concat(parts, axis=1)

    def unstack(self, dtype):
        """Per block, {piece name: tensor}; one split, and a reshape and unstack per piece."""
        columns = tf.split(tf.cast(self.params, dtype), self.sizes, axis=1)
        per_piece = [tf.unstack(tf.reshape(c, (self.n,) + tuple(shape)))
                     for c, (_, shape, _) in zip(columns, self.pieces)]
        return [dict(zip(self.index, block)) for block in zip(*per_piece)]

    def row(self, j, dtype):
        """Block j's {piece name: tensor}, for a block called on its own."""
        columns = tf.split(tf.cast(self.params[j], dtype), self.sizes)
        return {name: tf.reshape(c, shape) for c, (name, shape, _) in zip(columns, self.pieces)}

    def piece(self, name):
        """The named piece of every block, (n, *shape), as a numpy array."""
        i = self.index[name]
        start = sum(self.sizes[:i])
        return self.params.numpy()[:, start:start + self.sizes[i]].reshape(
            (self.n,) + tuple(self.pieces[i][1]))


class StackRow:
    """Block j of a ParamStack, as a block layer sees its weights. A plain object on purpose:
    Keras would track a ParamStack held by each block as that block's own sublayer."""

    def __init__(self, stack, j):
        self.stack, self.j = stack, j

    def weights(self, dtype):
        return self.stack.row(self.j, dtype)

    def numpy(self):
        return {name: self.stack.piece(name)[self.j] for name in self.stack.index}


# ---------------------------------------------------------------------------------------
# One traced function per block shape.
def bottleneck(x, weights, residual):
    """GELU before each conv of `weights` [(kernel, bias), ...]; `residual` adds x. x may be a
    tuple of tensors, read as one concatenated along channels without copying them into one:
    the first conv's kernel is split along its input channels instead (the posterior's input)."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if residual and len(parts) > 1:
        raise ValueError('a residual block takes one input tensor')
    flat = [t for pair in weights for t in pair]
    keep = _KEEP_SLOPES[-1] and parts[0].dtype != tf.float32
    key = (residual, keep, parts[0].dtype, tuple(tuple(p.shape[1:]) for p in parts),
           tuple(tuple(t.shape) for t in flat))
    if key not in _BLOCK_FUNCTIONS:
        signature = ([tf.TensorSpec([None, *p.shape[1:]], p.dtype) for p in parts]
                     + [tf.TensorSpec(t.shape, t.dtype) for t in flat])
        # A partial, not a lambda: TF counts traces per code object and would call the first
        # trace of each of these functions a retrace of one function, and warn.
        # Float32 blocks stay calls in the step's graph (not inlined): a fraction of the nodes
        # to instantiate and optimise before the first step, at the same steady speed. 16-bit
        # blocks are inlined: oneDNN's bfloat16 kernels ran 3-10% slower as calls.
        attributes = {'_noinline': True} if parts[0].dtype == tf.float32 else None
        _BLOCK_FUNCTIONS[key] = tf.function(functools.partial(_bottleneck, parts=len(parts), residual=residual,
                                                              keep=keep),
                                            input_signature=signature, autograph=False,
                                            experimental_attributes=attributes)
    out = _BLOCK_FUNCTIONS[key](*parts, *flat)
    out.set_shape(parts[0].shape[:1].concatenate(out.shape[1:]))       # the batch size, known outside
    return out


# Any batch size: eager calls with new batch sizes neither retrace nor warn. (One tf.function
# per shape, not one retracing function: that one would warn on every model.)
_BLOCK_FUNCTIONS = {}
_KEEP_SLOPES = [False]


@contextlib.contextmanager
def keeping_slopes(keep=True):
    """Blocks built within, in bfloat16 (any 16-bit dtype), keep each GELU's output and its
    float32 slope for the backward pass instead of recomputing both there from GELU's input:
    the same numbers, bit for bit, at three times the bytes per kept activation (2 + 4 instead
    of 2). In bfloat16 that made the train step faster for more memory; in float32 it gained
    nothing (docs/performance.md). train.py's step computes its loss within; evaluation and
    sampling take no gradient and keep nothing."""
    _KEEP_SLOPES.append(keep)
    try:
        yield
    finally:
        _KEEP_SLOPES.pop()


def _bottleneck(*inputs, parts, residual, keep):
    @tf.custom_gradient
    def block(*inputs):
        xs, weights = inputs[:parts], inputs[parts:]
        kernels, biases = weights[::2], weights[1::2]
        first = tf.split(kernels[0], [x.shape[-1] for x in xs], axis=2) if parts > 1 else kernels[:1]
        saved = []         # per conv input, all that the backward pass keeps of its GELU

        def gelu(x):
            if keep:
                g, slope = _gelu_and_slope(x)
                saved.append((g, slope))
                return g
            saved.append(x)
            return _gelu_forward(x)
        h = _conv_of_parts([gelu(x) for x in xs], first, biases[0])
        for kernel, bias in zip(kernels[1:], biases[1:]):
            h = conv(gelu(h), kernel, bias)
        out = _sum(xs[0], h) if residual else h

        def recalled(i, d_h):
            """The GELU output at conv input i, and d_g -> its gradient through GELU (plus a skip)."""
            if keep:
                g, slope = saved[i]
                return g, lambda d_g, skip=None: _times_slope(d_g, slope, skip)
            with tf.control_dependencies([d_h]):      # else the executor recomputes every GELU early
                g = _gelu_forward(saved[i])
            return g, lambda d_g, skip=None: _gelu_backward(saved[i], d_g, skip)

        def grad(d_out):
            d_h, d_weights = d_out, []
            for i in reversed(range(1, len(kernels))):
                g, through_gelu = recalled(parts + i - 1, d_h)
                d_kernel, d_g = _conv_gradients(g, kernels[i], d_h)
                d_weights = [d_kernel, tf.reduce_sum(d_h, axis=[0, 1, 2])] + d_weights
                d_h = through_gelu(d_g)
            d_xs, d_first = [], []
            for i, kernel in enumerate(first):
                g, through_gelu = recalled(i, d_h)
                d_kernel, d_g = _conv_gradients(g, kernel, d_h)
                d_first.append(d_kernel)
                d_xs.append(through_gelu(d_g, d_out if residual else None))
            d_kernel = tf.concat(d_first, axis=2) if parts > 1 else d_first[0]
            return d_xs + [d_kernel, tf.reduce_sum(d_h, axis=[0, 1, 2])] + d_weights
        return out, grad
    return block(*inputs)


def _conv_of_parts(xs, kernels, bias):
    """conv(concat(xs), concat(kernels)) + bias, without the concatenation: copying the
    posterior's input into one tensor (and slicing its gradient out again) cost more than the
    one pass that sums the parts; bfloat16 evaluation ran 16% faster without it."""
    if len(xs) == 1:
        return conv(xs[0], kernels[0], bias)
    return _sum(conv(xs[0], kernels[0], bias), *[conv(x, k) for x, k in zip(xs[1:], kernels[1:])])


# ---------------------------------------------------------------------------------------
# The block's pieces. GELU is recomputed in the backward pass instead of stored, which halves
# the activation memory (and the page faults of the first step); keeping_slopes() stores it.
_SQRT_HALF, _INV_SQRT_2PI = math.sqrt(0.5), 1. / math.sqrt(2. * math.pi)


# erf, not erfc: XLA's erf is a short polynomial. The element-wise kernels compute in float32
# inside XLA, where bfloat16 arithmetic on a CPU is slower than converting to float32 and back
# (docs/performance.md, "GELU: what remains"); for float32 the casts are no-ops.
@tf.function(jit_compile=True, autograph=False)
def _gelu_forward(x):
    x32 = tf.cast(x, tf.float32)
    return tf.cast(0.5 * x32 * (1. + tf.math.erf(_SQRT_HALF * x32)), x.dtype)


@tf.function(jit_compile=True, autograph=False)
def _gelu_and_slope(x):
    """GELU in x's dtype and its slope in float32, from one erf (keeping_slopes)."""
    x32 = tf.cast(x, tf.float32)
    erf = tf.math.erf(_SQRT_HALF * x32)
    return tf.cast(0.5 * x32 * (1. + erf), x.dtype), _gelu_slope(x32, erf)


def _gelu_slope(x32, erf=None):
    erf = tf.math.erf(_SQRT_HALF * x32) if erf is None else erf
    return 0.5 + 0.5 * erf + x32 * _INV_SQRT_2PI * tf.exp(-0.5 * x32 * x32)


@tf.function(jit_compile=True, autograph=False)
def _gelu_backward(x, dy, skip=None):
    """dy * gelu'(x), plus the skip connection's gradient in the same pass."""
    return _times(dy, _gelu_slope(tf.cast(x, tf.float32)), skip)


@tf.function(jit_compile=True, autograph=False)
def _times_slope(dy, slope, skip=None):
    """_gelu_backward with the slope kept from the forward pass."""
    return _times(dy, slope, skip)


def _times(dy, slope, skip):
    dx = tf.cast(dy, tf.float32) * slope
    return tf.cast(dx if skip is None else dx + tf.cast(skip, tf.float32), dy.dtype)


def _sum(*terms):
    """The terms added in float32 and rounded once, one XLA pass: TensorFlow's own bfloat16
    add is slower than its float32 add on CPUs (docs/performance.md). One
    traced function per shape, for any batch size, as the blocks have: the decoder's adds run
    outside the blocks, and an eager call at a new batch size would otherwise retrace."""
    key = (len(terms), terms[0].dtype, tuple(terms[0].shape[1:]))
    if key not in _SUM_FUNCTIONS:
        spec = tf.TensorSpec([None, *terms[0].shape[1:]], terms[0].dtype)
        # A partial for the reason bottleneck gives: TF counts traces per code object.
        _SUM_FUNCTIONS[key] = tf.function(functools.partial(_sum_in_float32), input_signature=[spec] * len(terms),
                                          jit_compile=True, autograph=False)
    out = _SUM_FUNCTIONS[key](*terms)
    out.set_shape(terms[0].shape)
    return out


def _sum_in_float32(*terms):
    return tf.cast(tf.add_n([tf.cast(t, tf.float32) for t in terms]), terms[0].dtype)


_SUM_FUNCTIONS = {}


@tf.custom_gradient
def add(*terms):
    """The sum of same-shaped tensors in one pass (the gradient passes to each unchanged)."""
    return _sum(*terms), lambda dy: [dy] * len(terms)


def conv(x, kernel, bias=None):
    if _as_matmul(x, kernel):
        return _pointwise(x, kernel, bias)
    y = tf.nn.conv2d(x, kernel, 1, 'SAME')
    return y if bias is None else tf.nn.bias_add(y, bias)


def _as_matmul(x, kernel):
    # A float32 1x1 conv as one matrix product, forward and for its input's gradient: faster
    # than TF's conv on CPUs; in bfloat16 oneDNN's conv is as fast or faster (docs/performance.md,
    # "Float32 1x1 convolutions as matrix products").
    return kernel.shape[:2] == (1, 1) and x.dtype == tf.float32


def _pointwise(x, kernel, bias=None, transpose_kernel=False):
    shape = tf.shape(x)
    y = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), tf.reshape(kernel, kernel.shape[2:]), transpose_b=transpose_kernel)
    if bias is not None:
        # Added to the product before the reshape: Grappler then fuses the two into one
        # oneDNN kernel (float32 evaluation spent 6% of its op time in a separate BiasAdd).
        y = tf.nn.bias_add(y, bias)
    return tf.reshape(y, tf.concat([shape[:-1], [y.shape[-1]]], 0))


def _conv_gradients(x, kernel, dy):
    """(d kernel, d x) of conv(x, kernel) given dy. A 1x1 conv's kernel gradient is one matrix
    product, which in bfloat16 is much faster than oneDNN's Conv2DBackpropFilter
    (docs/performance.md, "Where bfloat16 loses its speed")."""
    if kernel.shape[:2] == (1, 1):
        d_kernel = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), tf.reshape(dy, (-1, dy.shape[-1])), transpose_a=True)
        d_kernel = tf.reshape(d_kernel, kernel.shape)
    else:
        d_kernel = tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 1, 1, 1], padding='SAME')
    if _as_matmul(x, kernel):
        d_x = _pointwise(dy, kernel, transpose_kernel=True)
    else:
        d_x = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=[1, 1, 1, 1], padding='SAME')
    return d_kernel, d_x


# ---------------------------------------------------------------------------------------
# Rematerialisation.
def rematerialised(fn, *args):
    """fn(*args), keeping only args for the backward pass: everything fn computes in between is
    computed again there, once the gradient of its outputs has arrived (tf.recompute_grad).
    args and fn's result: nested structures of float tensors. Whatever else fn reads (seeds,
    a layer's own variables) it reads again in the recomputation, so its random draws must be
    seeded."""
    flat_args, structure = tf.nest.flatten(args), []

    def flat_fn(*flat):
        with keeping_slopes(False):        # what it would keep, it computes again anyway
            out = fn(*tf.nest.pack_sequence_as(args, list(flat)))
        structure.append(out)
        return tf.nest.flatten(out)     # tf.recompute_grad pairs output gradients with a flat list
    flat_out = tf.recompute_grad(flat_fn)(*flat_args)
    return tf.nest.pack_sequence_as(structure[0], flat_out)


# ---------------------------------------------------------------------------------------
# The direct port all this is measured against: VDVAE(hp, layout='naive').
class PerBlockParams(keras.layers.Layer):
    """ParamStack's interface over one variable per piece of every block, as a direct port of
    the PyTorch code has them."""

    def __init__(self, n, pieces, **kwargs):
        super().__init__(**kwargs)
        self.n, self.pieces = n, list(pieces)
        self.index = {name: i for i, (name, _, _) in enumerate(self.pieces)}
        init = lambda b: keras.initializers.RandomUniform(-b, b) if b else 'zeros'
        self.per_block = [[self.add_weight(shape=shape, initializer=init(bound), name=f'{j}_{name.replace("/", "_")}')
                           for name, shape, bound in self.pieces] for j in range(n)]
        self.built = True

    def unstack(self, dtype):
        return [self.row(j, dtype) for j in range(self.n)]

    def row(self, j, dtype):
        return {name: tf.cast(v, dtype) for name, v in zip(self.index, self.per_block[j])}

    def piece(self, name):
        return np.stack([block[self.index[name]].numpy() for block in self.per_block])


def naive_bottleneck(x, weights, residual):
    """bottleneck() in plain TF ops with autodiff, on the concatenated input."""
    h = x = tf.concat(x, -1) if isinstance(x, (tuple, list)) else x
    for kernel, bias in weights:
        h = conv(tf.nn.gelu(h, approximate=False), kernel, bias)
    return x + h if residual else h


LAYOUTS = {'stacked': (ParamStack, bottleneck), 'naive': (PerBlockParams, naive_bottleneck)}


def layout(name):
    """A model's (parameter holder, block function): 'stacked' (this file's), or 'naive'."""
    if name not in LAYOUTS:
        raise ValueError(f'layout={name!r}: choose from {", ".join(LAYOUTS)}')
    return LAYOUTS[name]
