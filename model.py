"""The very deep VAE of Child (2020), paper figure 3, in TensorFlow/Keras. NHWC throughout.

    bottom-up (Encoder)                      top-down (Decoder), one DecBlock per dec_blocks entry
    x -> in_conv -> Block ... -> acts[r]     state[r] (+ upsampled state[mixin])
                                               |-> prior(state)            -> p_mean, p_logsigma, x_res
                                               |-> posterior(state, acts[r]) -> q_mean, q_logsigma
                                               z ~ q (training) | p at temperature t (sampling) | given
                                               state[r] = resnet(state + x_res + z_proj(z))
                                             image res: state * gain + bias -> 1x1 conv -> DMoL params

Graph size is what makes a port of this model slow to start (see tensorflow-notes.md): every
resolution stage keeps all the weights of all its blocks in one variable (ParamStack), split
once per call, so the cifar10 preset has 21 variables instead of ~2,800.
"""
import functools
import math
import random

import keras
import numpy as np
import tensorflow as tf

from hparams import parse_blocks, widths


# ---------------------------------------------------------------------------------------
# Likelihood: discretized mixture of logistics on the raw parameter tensor (B, H, W, 10 M):
# channels [0:M] mixture logits, then per colour c [means M | log_scales M | coeffs M].
def _dmol_split(params):
    m = params.shape[-1] // 10
    logits = params[..., :m]
    rest = tf.reshape(params[..., m:], tf.concat([tf.shape(params)[:-1], [3, 3 * m]], 0))
    return logits, rest[..., :m], tf.maximum(rest[..., m:2 * m], -7.), tf.tanh(rest[..., 2 * m:])


def dmol_log_probs(params, target, low_bit=False):
    """log p(target) per pixel (B, H, W); targets in [-1, 1], 8-bit or (low_bit) 5-bit bins."""
    params, target = tf.cast(params, tf.float32), tf.cast(target, tf.float32)
    logits, means, log_scales, coeffs = _dmol_split(params)
    x = target[..., None]                                   # (B, H, W, 3, 1)
    # Colours are autoregressive: green's mean sees red, blue's sees red and green.
    means = tf.stack([
        means[..., 0, :],
        means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :],
        means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :],
    ], axis=-2)
    centered = x - means
    inv_scale = tf.exp(-log_scales)
    half_bin, log_half_range = (1. / 31., math.log(15.5)) if low_bit else (1. / 255., math.log(127.5))
    plus = inv_scale * (centered + half_bin)
    minus = inv_scale * (centered - half_bin)
    log_cdf_plus = plus - tf.nn.softplus(plus)              # bottom bin: all mass below
    log_one_minus_cdf_minus = -tf.nn.softplus(minus)        # top bin: all mass above
    cdf_delta = _sigmoid(plus) - _sigmoid(minus)
    mid = inv_scale * centered
    # Where the bin mass underflows float32, use the density at the bin centre times its width.
    log_pdf_mid = mid - log_scales - 2. * tf.nn.softplus(mid) - log_half_range
    log_probs = tf.where(
        x < -0.999, log_cdf_plus,
        tf.where(x > 0.999, log_one_minus_cdf_minus,
                 tf.where(cdf_delta > 1e-5, tf.math.log(tf.maximum(cdf_delta, 1e-12)), log_pdf_mid)))
    log_probs = tf.reduce_sum(log_probs, axis=-2) + tf.nn.log_softmax(logits)
    return tf.reduce_logsumexp(log_probs, axis=-1)


@tf.custom_gradient
def _sigmoid(v):
    """A difference of two sigmoids near 1 cancels badly in float32; 1 / (1 + exp(-v)), as
    PyTorch computes it, keeps our NLL within 1e-6 of the official one where Eigen's rational
    tf.sigmoid drifts by 1e-5. Its autodiff gradient is inf/inf = NaN once exp(-v) overflows,
    so the gradient is the stable y (1 - y)."""
    y = 1. / (1. + tf.exp(-v))
    return y, lambda dy: dy * y * (1. - y)


def dmol_nll(params, target, low_bit=False):
    """Per-image negative log-likelihood in nats per dimension (the paper's distortion)."""
    log_probs = dmol_log_probs(params, target, low_bit)
    dims = tf.cast(tf.reduce_prod(tf.shape(target)[1:]), tf.float32)
    return -tf.reduce_sum(log_probs, axis=[1, 2]) / dims


def dmol_sample(params, seed=None):
    """uint8 images (B, H, W, 3) drawn from the mixture; `seed` a [2] int tensor or None."""
    params = tf.cast(params, tf.float32)
    logits, means, log_scales, coeffs = _dmol_split(params)
    seed_pick, seed_noise = tf.unstack(_split_seed(seed, 2))
    u = _uniform(tf.shape(logits), seed_pick)
    pick = tf.one_hot(tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1),
                      logits.shape[-1])[..., None, :]      # Gumbel-max choice of component
    means, coeffs = tf.reduce_sum(means * pick, -1), tf.reduce_sum(coeffs * pick, -1)
    log_scales = tf.reduce_sum(log_scales * pick, -1)
    u = _uniform(tf.shape(means), seed_noise)
    x = means + tf.exp(log_scales) * (tf.math.log(u) - tf.math.log(1. - u))
    r = tf.clip_by_value(x[..., 0], -1., 1.)
    g = tf.clip_by_value(x[..., 1] + coeffs[..., 0] * r, -1., 1.)
    b = tf.clip_by_value(x[..., 2] + coeffs[..., 1] * r + coeffs[..., 2] * g, -1., 1.)
    return to_uint8(tf.stack([r, g, b], axis=-1))


def to_uint8(x):
    """[-1, 1] -> uint8, truncating like the official sampler."""
    return tf.cast(tf.clip_by_value((x + 1.) * 127.5, 0., 255.), tf.uint8)


def gaussian_kl(q_mean, q_logsigma, p_mean, p_logsigma):
    """KL(q || p) per element for diagonal Gaussians given by mean and log-sigma."""
    return (-0.5 + p_logsigma - q_logsigma
            + 0.5 * (tf.exp(q_logsigma) ** 2 + (q_mean - p_mean) ** 2) / tf.exp(p_logsigma) ** 2)


def gaussian_log_density(x, mean, logsigma):
    """log N(x; mean, exp(logsigma)^2) per element."""
    return -0.5 * ((x - mean) * tf.exp(-logsigma)) ** 2 - logsigma - 0.5 * math.log(2. * math.pi)


# Every draw of the model goes through _split_seed, _normal or _uniform. XLA's stateless
# generators give other numbers than TF's kernels for some seeds, so a compiled step (and a
# TPU's) draws noise of its own; the XLA tests swap these three for hashes both agree on.
def _normal(shape, seed, rows=None):
    """rows=(offset, total): rows offset.. of a draw for `total` rows (offset may be a
    tensor, as a TPU replica's id is; the size stays static for XLA). rows=(offset, total,
    copies): the batch is `copies` copies of its images, one after the other (the
    importance-weighted bound's draws), and copy c gets rows offset.. of draw c."""
    if rows is None:
        return tf.random.stateless_normal(shape, seed)
    return _rows_of(tf.random.stateless_normal, shape, seed, rows)


def _rows_of(draw, shape, seed, rows):
    """The rows `rows` asks for of draw(full shape, seed). One copy draws the same numbers as
    a draw of shape (total, ...): the generators count elements, not dimensions."""
    offset, total, copies = rows if len(rows) == 3 else (*rows, 1)
    full = draw(tf.concat([[copies, total], shape[1:]], 0), seed)
    part = tf.slice(full, tf.concat([[0, offset], tf.zeros_like(shape[1:])], 0),
                    tf.concat([[copies, shape[0] // copies], shape[1:]], 0))
    return tf.reshape(part, shape)


def _uniform(shape, seed):
    return tf.random.stateless_uniform(shape, seed, 1e-5, 1. - 1e-5)


def _split_seed(seed, n):
    """n independent stateless seeds (n, 2) from one [2] seed, or from the global RNG if None."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=2 ** 31 - 1, dtype=tf.int32)
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n)


# ---------------------------------------------------------------------------------------
# Building blocks.
def _init_bound(fan_in, scale=1.):
    """PyTorch's default conv init is U(+-1/sqrt(fan_in)); `scale` multiplies it (0: zeros)."""
    return scale / math.sqrt(fan_in)


def _torch_uniform(fan_in, scale=1.):
    bound = _init_bound(fan_in, scale)
    if bound == 0:
        return 'zeros'
    return keras.initializers.RandomUniform(-bound, bound)


# GELU (exact, erf form) is ~half the step time and ~60% of the graph's nodes when written
# as TF ops with autodiff. One XLA-fused kernel each way is faster and is one graph node.
_SQRT_HALF, _INV_SQRT_2PI = math.sqrt(0.5), 1. / math.sqrt(2. * math.pi)


# (XLA's erf is a short polynomial; erfc is 2.5x slower forward and 3.5x backward here.)
@tf.function(jit_compile=True, autograph=False)
def _gelu_forward(x):
    return 0.5 * x * (1. + tf.math.erf(_SQRT_HALF * x))


@tf.function(jit_compile=True, autograph=False)
def _gelu_backward(x, dy):
    return dy * (0.5 + 0.5 * tf.math.erf(_SQRT_HALF * x) + x * _INV_SQRT_2PI * tf.exp(-0.5 * x * x))


def conv(x, kernel, bias):
    return tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, 'SAME'), bias)


@tf.custom_gradient
def gelu_conv(x, kernel, bias):
    """conv(gelu(x)) keeping only x for the backward pass: gelu(x) is recomputed there,
    which halves the activation memory (and the page faults of the first step)."""
    def grad(dy):
        with tf.control_dependencies([dy]):  # else the executor recomputes all of them early
            g = _gelu_forward(x)
        d_kernel = tf.raw_ops.Conv2DBackpropFilter(
            input=g, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 1, 1, 1], padding='SAME')
        d_g = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=[1, 1, 1, 1], padding='SAME')
        return _gelu_backward(x, d_g), d_kernel, tf.reduce_sum(dy, axis=[0, 1, 2])
    return conv(_gelu_forward(x), kernel, bias), grad


def bottleneck(x, weights, residual):
    """Figure 3's residual block: GELU before each of conv 1x1, 3x3, 3x3, 1x1."""
    flat = [t for pair in weights for t in pair]
    key = (residual, x.dtype, tuple(x.shape[1:]), tuple(tuple(t.shape) for t in flat))
    if key not in _BLOCK_FUNCTIONS:
        signature = [tf.TensorSpec([None, *x.shape[1:]], x.dtype)] + [tf.TensorSpec(t.shape, t.dtype) for t in flat]
        # A partial, not a lambda: TF counts traces per code object and would call the first
        # trace of each of these functions a retrace of one function, and warn.
        _BLOCK_FUNCTIONS[key] = tf.function(functools.partial(_bottleneck, residual=residual),
                                            input_signature=signature, autograph=False)
    out = _BLOCK_FUNCTIONS[key](x, *flat)
    out.set_shape(x.shape[:1].concatenate(out.shape[1:]))       # the batch size, known outside
    return out


# One traced function per block shape: the step's graph holds a call per block instead of
# its ~30 ops, so tracing and differentiating ~250 blocks costs ~20 small traces. Any batch
# size: eager calls with new batch sizes neither retrace nor warn. (One tf.function per
# shape, not one retracing function: that one would warn on every model.)
_BLOCK_FUNCTIONS = {}


def _bottleneck(x, *weights, residual):
    h = x
    for kernel, bias in zip(weights[::2], weights[1::2]):
        h = gelu_conv(h, kernel, bias)
    return x + h if residual else h


class ParamStack(keras.layers.Layer):
    """The weights of `n` same-shaped blocks in ONE variable (n, P): each row holds one
    block's named pieces (kernels, biases) flattened end to end. A resolution stage is then
    one variable, and the optimizer, EMA and all-reduce touch ~20 variables, not ~2,800.

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

    def piece(self, name):
        """The named piece of every block, (n, *shape), as a numpy array."""
        i = self.index[name]
        start = sum(self.sizes[:i])
        return self.params.numpy()[:, start:start + self.sizes[i]].reshape(
            (self.n,) + tuple(self.pieces[i][1]))


def _block_pieces(role, c_in, c_mid, c_out, use_3x3, last_scale=1.):
    """Figure 3's block: 1x1, 3x3, 3x3, 1x1 convs (3x3 -> 1x1 at resolutions <= 2).
    `last_scale` scales the last conv's init (0: zero init)."""
    k = 3 if use_3x3 else 1
    shapes = [(1, c_in, c_mid), (k, c_mid, c_mid), (k, c_mid, c_mid), (1, c_mid, c_out)]
    pieces = []
    for i, (ks, ci, co) in enumerate(shapes, 1):
        bound = _init_bound(ks * ks * ci, last_scale if i == 4 else 1.)
        pieces += [(f'{role}c{i}_kernel', (ks, ks, ci, co), bound), (f'{role}c{i}_bias', (co,), 0.)]
    return pieces


def _block_weights(block, role):
    return [(block[f'{role}c{i}_kernel'], block[f'{role}c{i}_bias']) for i in range(1, 5)]


def _stage_counts(blocks):
    counts = {}
    for res, _ in blocks:
        counts[res] = counts.get(res, 0) + 1
    return counts


class _Stages:
    """Per-resolution stacked weights handed out block by block, in string order."""

    def __init__(self, unstacked):
        self.unstacked, self.used = unstacked, {r: 0 for r in unstacked}

    def next(self, res):
        self.used[res] += 1
        return self.unstacked[res][self.used[res] - 1]


# ---------------------------------------------------------------------------------------
class Encoder(keras.layers.Layer):
    """Bottom-up path: in_conv, then residual blocks; keeps the last activation per resolution."""

    def __init__(self, hp, **kwargs):
        super().__init__(**kwargs)
        self.hp, self.width = hp, widths(hp)
        self.blocks = parse_blocks(hp.enc_blocks)
        self.in_kernel = self.add_weight(shape=(3, 3, hp.image_channels, hp.width), name='in_kernel',
                                         initializer=_torch_uniform(9 * hp.image_channels))
        self.in_bias = self.add_weight(shape=(hp.width,), initializer='zeros', name='in_bias')
        scale = math.sqrt(1. / len(self.blocks))
        self.stages = {}
        for res, n in _stage_counts(self.blocks).items():
            w = self.width[res]
            self.stages[res] = ParamStack(n, _block_pieces(
                '', w, int(w * hp.bottleneck_multiple), w, res > 2, last_scale=scale), name=f'enc{res}')
        self.built = True

    def activations(self, x):
        dtype = self.compute_dtype
        x = conv(tf.cast(x, dtype), tf.cast(self.in_kernel, dtype), tf.cast(self.in_bias, dtype))
        acts = {self.hp.image_size: x}
        stages = _Stages({r: s.unstack(dtype) for r, s in self.stages.items()})
        for res, down in self.blocks:
            x = bottleneck(x, _block_weights(stages.next(res), ''), residual=True)
            if down:
                x = tf.nn.avg_pool2d(x, down, down, 'VALID')
                res //= down
            if x.shape[-1] < self.width[res]:
                x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.width[res] - x.shape[-1]]])
            acts[res] = x
        return acts


def _decoder_pieces(width, hp, n_total, use_3x3):
    """One DecBlock: posterior, prior (last conv zero), z_proj and resnet, with the sqrt(1/N)
    init scaling of z_proj and of resnet's last conv."""
    mid, z, scale = int(width * hp.bottleneck_multiple), hp.zdim, math.sqrt(1. / n_total)
    return (_block_pieces('posterior/', 2 * width, mid, 2 * z, use_3x3)
            + _block_pieces('prior/', width, mid, 2 * z + width, use_3x3, last_scale=0.)
            + [('z_proj/kernel', (1, 1, z, width), _init_bound(z, scale)), ('z_proj/bias', (width,), 0.)]
            + _block_pieces('resnet/', width, mid, width, use_3x3, last_scale=scale))


def _upsample(x, factor):
    """Nearest-neighbour unpooling by an integer factor."""
    if factor == 1:
        return x
    b, h, w, c = tf.unstack(tf.shape(x))
    x = tf.broadcast_to(x[:, :, None, :, None, :], [b, h, factor, w, factor, c])
    return tf.reshape(x, [b, h * factor, w * factor, c])


class Decoder(keras.layers.Layer):
    """Top-down path: one DecBlock per dec_blocks entry, then gain/bias and the DMoL head."""

    def __init__(self, hp, **kwargs):
        super().__init__(**kwargs)
        self.hp, self.width = hp, widths(hp)
        self.blocks = parse_blocks(hp.dec_blocks)
        self.stages = {res: ParamStack(n, _decoder_pieces(self.width[res], hp, len(self.blocks), res > 2),
                                       name=f'dec{res}')
                       for res, n in _stage_counts(self.blocks).items()}
        self.bias_states = {res: self.add_weight(shape=(1, res, res, self.width[res]),
                                                 initializer='zeros', name=f'bias_state{res}')
                            for res in sorted(self.stages) if res <= hp.no_bias_above}
        self.gain = self.add_weight(shape=(hp.width,), initializer='ones', name='gain')
        self.bias = self.add_weight(shape=(hp.width,), initializer='zeros', name='bias')
        self.out_kernel = self.add_weight(shape=(1, 1, hp.width, 10 * hp.num_mixtures), name='out_kernel',
                                          initializer=_torch_uniform(hp.width))
        self.out_bias = self.add_weight(shape=(10 * hp.num_mixtures,), initializer='zeros', name='out_bias')
        self.built = True

    def top_down(self, n, acts=None, latents=(), temperatures=None, seed=None, noise_rows=None):
        """Run every DecBlock in order. With `acts` (the encoder's), z comes from the posterior
        and each layer reports its KL; without, from the prior at `temperatures[i]`. The first
        len(latents) layers use the given latents instead. Returns (DMoL params, per-layer dicts
        with z, the prior's (p_mean, p_logsigma) and, on the posterior path, q and kl).
        noise_rows=(offset, total): draw noise for a batch of `total` images and use rows
        offset..offset+n, so a replica's images get the noise they would get in one batch."""
        dtype, z_dim = self.compute_dtype, self.hp.zdim
        noise_seeds = _split_seed(seed, len(self.blocks))
        stages = _Stages({r: s.unstack(dtype) for r, s in self.stages.items()})
        state = {r: tf.broadcast_to(tf.cast(b, dtype), [n, r, r, b.shape[-1]])
                 for r, b in self.bias_states.items()}
        layers = []
        for i, (res, mixin) in enumerate(self.blocks):
            w, weights, out = self.width[res], stages.next(res), {}
            x = state[res] if res in state else tf.zeros([n, res, res, w], dtype)
            if mixin is not None:
                x = x + _upsample(state[mixin][..., :w], res // mixin)
            prior = bottleneck(x, _block_weights(weights, 'prior/'), residual=False)
            # tf.split, not slicing: a slice's gradient is a full-size zero tensor per slice.
            p_mean, p_logsigma, x_res = tf.split(prior, [z_dim, z_dim, w], axis=-1)
            out['p'] = (p_mean, p_logsigma)
            if acts is not None:
                q = bottleneck(tf.concat([x, acts[res]], -1), _block_weights(weights, 'posterior/'),
                               residual=False)
                out['q'] = q_mean, q_logsigma = tf.split(q, 2, axis=-1)
                kl = gaussian_kl(*[tf.cast(t, tf.float32) for t in (q_mean, q_logsigma, p_mean, p_logsigma)])
                out['kl'] = tf.reduce_sum(kl, axis=[1, 2, 3])
            x = x + x_res
            if i < len(latents):
                z = tf.cast(latents[i], dtype)
            else:
                eps = tf.cast(_normal(tf.shape(p_mean), noise_seeds[i], noise_rows), dtype)
                if acts is not None:
                    z = q_mean + tf.exp(q_logsigma) * eps
                else:
                    z = p_mean + tf.exp(p_logsigma) * tf.cast(temperatures[i], dtype) * eps
            out['z'] = z
            z_proj = conv(z, weights['z_proj/kernel'], weights['z_proj/bias'])
            x = bottleneck(x + z_proj, _block_weights(weights, 'resnet/'), residual=True)
            state[res] = x
            layers.append(out)
        x = state[self.hp.image_size] * tf.cast(self.gain, dtype) + tf.cast(self.bias, dtype)
        params = conv(x, tf.cast(self.out_kernel, dtype), tf.cast(self.out_bias, dtype))
        return tf.cast(params, tf.float32), layers


# ---------------------------------------------------------------------------------------
class VDVAE(keras.Model):
    """The whole model. `elbo`, `distortion` and `rate` are per-image losses in nats/dim
    (the negative ELBO, as the paper reports it); divide by ln 2 for bits/dim.

    x_in: the preprocessed network input (B, H, W, 3); target: the image in [-1, 1].
    seed: an optional [2] int tensor making every random draw reproducible."""

    def __init__(self, hp, **kwargs):
        super().__init__(name=kwargs.pop('name', 'vdvae'), **kwargs)
        self.hp = hp
        self.encoder = Encoder(hp, name='encoder')
        self.decoder = Decoder(hp, name='decoder')
        self.num_layers = len(self.decoder.blocks)
        self.built = True

    def call(self, inputs, seed=None):
        return self.losses_per_image(*inputs, seed=seed)

    def losses_per_image(self, x_in, target, seed=None, noise_rows=None):
        params, layers = self._posterior_pass(x_in, seed, noise_rows)
        distortion = dmol_nll(params, target, self.hp.low_bit)
        rate = tf.add_n([l['kl'] for l in layers]) / self._dims()
        return dict(elbo=distortion + rate, distortion=distortion, rate=rate)

    def log_weights(self, x_in, target, seed=None, noise_rows=None):
        """log p(x, z) - log q(z | x) in nats per image, for one z ~ q(z | x): the ELBO's
        integrand with every latent's full Gaussian log-density (not the analytic KL), so its
        mean over z is -elbo * dims and its log-mean-exp over K draws is the tighter
        importance-weighted bound on log p(x) (Burda et al., 2015)."""
        params, layers = self._posterior_pass(x_in, seed, noise_rows)
        log_ratio = []
        for l in layers:
            z, (q_mean, q_logsigma), (p_mean, p_logsigma) = [
                tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), l[k]) for k in ('z', 'q', 'p')]
            log_ratio.append(tf.reduce_sum(gaussian_log_density(z, p_mean, p_logsigma)
                                           - gaussian_log_density(z, q_mean, q_logsigma), axis=[1, 2, 3]))
        return -dmol_nll(params, target, self.hp.low_bit) * self._dims() + tf.add_n(log_ratio)

    def rate_per_layer(self, x_in, seed=None):
        """(B, num_layers): each decoder layer's KL in nats/dim; rows sum to `rate`."""
        _, layers = self._posterior_pass(x_in, seed)
        return tf.stack([l['kl'] for l in layers], axis=1) / self._dims()

    def posterior_latents(self, x_in, seed=None):
        """One z ~ q(z | x, z_above) per decoder layer, in order."""
        return [l['z'] for l in self._posterior_pass(x_in, seed)[1]]

    def decode(self, latents, n=None, temperature=1., seed=None):
        """DMoL parameters from the first len(latents) latents, the rest drawn from the prior
        at `temperature` (one float, or one per layer)."""
        if n is None:
            n = tf.shape(latents[0])[0]
        if len(latents) > self.num_layers:
            raise ValueError(f'{len(latents)} latents given but the decoder has {self.num_layers} layers')
        return self.decoder.top_down(n, latents=list(latents), seed=seed,
                                     temperatures=self.temperatures(temperature))[0]

    def decode_images(self, latents, n=None, temperature=1., seed=None):
        seed_z, seed_x = tf.unstack(_split_seed(seed, 2))
        return dmol_sample(self.decode(latents, n, temperature, seed_z), seed_x)

    def sample(self, n, temperature=1., seed=None):
        """n unconditional uint8 images (n, H, W, 3)."""
        return self.decode_images([], n, temperature, seed)

    def temperatures(self, temperature):
        """One float, or a sequence with one value per decoder layer -> float32 (num_layers,)."""
        t = tf.convert_to_tensor(temperature, tf.float32)
        if t.shape.rank == 0:
            return tf.fill([self.num_layers], t)
        if t.shape != (self.num_layers,):
            raise ValueError(f'temperature schedule has {t.shape[0]} values; the decoder has '
                             f'{self.num_layers} layers (give one value, or one per layer)')
        return t

    def _posterior_pass(self, x_in, seed, noise_rows=None):
        acts = self.encoder.activations(x_in)
        return self.decoder.top_down(tf.shape(x_in)[0], acts=acts, seed=seed, noise_rows=noise_rows)

    def _dims(self):
        return float(self.hp.image_size ** 2 * self.hp.image_channels)


def checkpoint_key(variable):
    """A weight's name in this project's checkpoints (stable across Keras versions' paths)."""
    return variable.path.replace('/', '.')


def count_params(model):
    return int(sum(np.prod(v.shape) for v in model.weights))
