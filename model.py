"""The very deep VAE of Child (2020) in TensorFlow/Keras, class by class as the paper's
figure 3 draws it. NHWC throughout.

    figure 3                                 this file
    bottom-up path                           Encoder: in_conv, one EncBlock per enc_blocks entry
      res block, then pool                   EncBlock: bottleneck(x) + x, avg-pool by `down`
    top-down path                            Decoder: initial states, one DecBlock per dec_blocks
                                             entry (`model.decoder.blocks[i]` is layer i)
      unpool                                 DecBlock: x = state[res] + unpool(state[mixin])
      p(z_i | z_<i)                            prior(x)            -> p_mean, p_logsigma, x_res
      q(z_i | x, z_<i)                         posterior(x, acts)  -> q_mean, q_logsigma
      z ~ q (training), ~ p at temperature t     z, its KL(q || p) per image
        (sampling), or given
      res block                                state[res] = resnet(x + x_res + z_proj(z))
    p(x | z_1..z_L)                          Decoder: state * gain + bias -> 1x1 conv -> DMoL
                                             (likelihood.py)
    -ELBO = distortion + rate                VDVAE, in nats per dimension

Figure 5's variants of the top-down path are hyperparameters: `unpool='learned'` replaces the
nearest-neighbour unpooling by a learned one, `top_down_block='ffn'` drops the res block's
residual connection. The defaults are the paper's model.

The blocks own no variables: each resolution stage keeps all its blocks' weights in one
stacked variable and a block reads its row (fastgraph.py says why; docs/performance.md
measures it).
"""
import collections
import functools
import math

import keras
import numpy as np
import tensorflow as tf

import fastgraph
import likelihood
import update
from fastgraph import StackRow, add, bottleneck, conv, rematerialised
from hparams import parse_blocks, widths


# ---------------------------------------------------------------------------------------
# Figure 3.
def block_convs(block):
    """A block's convs from its class's ROLES (what it is made of, in the official order: role,
    official module, 4 convs c1..c4 or 1, run on the prior path too) as (pieces' prefix, official
    keys' prefix, prior path): ('prior/c1_', 'prior.c1.', True) for prior/c1_kernel, prior.c1.weight."""
    return [(role + (f'c{i}_' if n > 1 else ''), module + (f'c{i}.' if n > 1 else ''), prior)
            for role, module, n, prior in block.ROLES for i in range(1, n + 1)]


def _pieces(block, convs):
    """ParamStack's pieces of one block, in block_convs' order: convs {role: each conv's (kernel
    size, in, out, init scale)}, init U(+-scale/sqrt(fan_in)) as PyTorch's convs (0: zeros)."""
    shapes, pieces = [c for role, *_ in block.ROLES for c in convs[role]], []
    for (name, _, _), (k, c_in, c_out, scale) in zip(block_convs(block), shapes, strict=True):
        pieces += [(f'{name}kernel', (k, k, c_in, c_out), scale / math.sqrt(k * k * c_in)),
                   (f'{name}bias', (c_out,), 0.)]
    return pieces


def _bottleneck_convs(c_in, c_mid, c_out, use_3x3, last_scale=1.):
    """A bottleneck's 1x1, 3x3, 3x3, 1x1 convs (3x3 -> 1x1 at resolutions <= 2); last_scale 0: zeros."""
    k = 3 if use_3x3 else 1
    return [(1, c_in, c_mid, 1.), (k, c_mid, c_mid, 1.), (k, c_mid, c_mid, 1.), (1, c_mid, c_out, last_scale)]


def _convs(params, role):
    """A block's [(kernel, bias)] x 4 for bottleneck(), from its row of named pieces."""
    return [(params[f'{role}c{i}_kernel'], params[f'{role}c{i}_bias']) for i in range(1, 5)]


def _torch_uniform(fan_in):
    return keras.initializers.RandomUniform(-1. / math.sqrt(fan_in), 1. / math.sqrt(fan_in))


class EncBlock(keras.layers.Layer):
    """Bottom-up: a residual bottleneck block (GELU before each of conv 1x1, 3x3, 3x3, 1x1),
    then average pooling by `down` if the block string says 'RdK', and zero channels padded
    on where the next resolution is wider. Its weights are `row` of its stage's stack;
    `bottleneck`: the block function of the model's layout (fastgraph.layout)."""
    ROLES = (('', '', 4, False),)           # what it is made of (block_convs)

    def __init__(self, res, down, width_out, row, bottleneck=bottleneck, **kwargs):
        super().__init__(**kwargs)
        self.res, self.down, self.width_out, self.row, self.bottleneck = res, down, width_out, row, bottleneck
        self.res_out = res // (down or 1)
        self.built = True

    def call(self, x, params=None):
        """params: this block's pieces, if the caller has split the stage already."""
        params = params if params is not None else self.row.weights(self.compute_dtype)
        x = self.bottleneck(x, _convs(params, ''), residual=True)
        if self.down:
            x = tf.nn.avg_pool2d(x, self.down, self.down, 'VALID')
        if x.shape[-1] < self.width_out:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.width_out - x.shape[-1]]])
        return x

    def pieces(self):
        """{piece name: numpy array} of this block's weights (a row of its stage's stack)."""
        return self.row.numpy()


class DecBlock(keras.layers.Layer):
    """Top-down: one stochastic layer z_i at resolution `res` (figure 3, right). Its weights
    are `row` of its stage's stack: prior, posterior (the paper's q; `enc` in the official
    code), z_proj and resnet.

    state: {resolution: tensor}, the top-down path so far; the block returns the new
    state[res] and a dict with z, the prior's (p_mean, p_logsigma) and, given the encoder's
    activations, the posterior's (q_mean, q_logsigma) and the KL per image in nats."""
    ROLES = (('posterior/', 'enc.', 4, False), ('prior/', 'prior.', 4, True), ('z_proj/', 'z_proj.', 1, True),
             ('resnet/', 'resnet.', 4, True))         # what it is made of (block_convs)

    def __init__(self, hp, res, mixin, width, row, unpool=None, bottleneck=bottleneck, **kwargs):
        super().__init__(**kwargs)
        self.res, self.mixin, self.width, self.row, self.bottleneck = res, mixin, width, row, bottleneck
        self.zdim, self.residual = hp.zdim, hp.top_down_block == 'res'
        self.unpool = unpool       # a LearnedUnpool, or None for nearest neighbours
        self.built = True

    def call(self, state, acts=None, latent=None, temperature=1., noise=None, params=None):
        """acts: the encoder's activation at this resolution (z from the posterior); latent: a
        given z, or a function of this layer's dict (p, and q given acts) returning z; else z
        from the prior at `temperature`. noise: shape -> standard normal draws (the decoder
        passes each layer its seeded draw; default: unseeded). params: this block's pieces,
        if the caller has split the stage already."""
        dtype = self.compute_dtype
        params = params if params is not None else self.row.weights(dtype)
        x = state[self.res]
        if self.mixin is not None:
            above = state[self.mixin]
            factor = self.res // self.mixin
            x = add(x, self.unpool(above) if self.unpool else _nearest_unpool(above[..., :self.width], factor))
        prior = self.bottleneck(x, _convs(params, 'prior/'), residual=False)
        # tf.split, not slicing: a slice's gradient is a full-size zero tensor per slice.
        p_mean, p_logsigma, x_res = tf.split(prior, [self.zdim, self.zdim, self.width], axis=-1)
        layer = {'p': (p_mean, p_logsigma)}
        if acts is not None:
            q = self.bottleneck((x, acts), _convs(params, 'posterior/'), residual=False)
            layer['q'] = q_mean, q_logsigma = tf.split(q, 2, axis=-1)
            kl = gaussian_kl(*[tf.cast(t, tf.float32) for t in (q_mean, q_logsigma, p_mean, p_logsigma)])
            layer['kl'] = tf.reduce_sum(kl, axis=[1, 2, 3])
        if callable(latent):        # z chosen from this layer's distributions (compress.py's coder)
            z = tf.cast(latent(layer), dtype)
        elif latent is not None:
            z = tf.cast(latent, dtype)
        else:
            noise = noise or (lambda shape: _normal(shape, _split_seed(None, 1)[0]))
            eps = tf.cast(noise(tf.shape(p_mean)), dtype)
            if acts is not None:
                z = q_mean + tf.exp(q_logsigma) * eps
            else:
                z = p_mean + tf.exp(p_logsigma) * tf.cast(temperature, dtype) * eps
        layer['z'] = z
        z_proj = conv(z, params['z_proj/kernel'], params['z_proj/bias'])
        return self.bottleneck(add(x, x_res, z_proj), _convs(params, 'resnet/'), residual=self.residual), layer

    def pieces(self):
        """{piece name: numpy array} of this block's weights (a row of its stage's stack)."""
        return self.row.numpy()


def _nearest_unpool(x, factor):
    """Nearest-neighbour unpooling by an integer factor."""
    if factor == 1:
        return x
    b, h, w, c = tf.unstack(tf.shape(x))
    x = tf.broadcast_to(x[:, :, None, :, None, :], [b, h, factor, w, factor, c])
    return tf.reshape(x, [b, h * factor, w * factor, c])


class LearnedUnpool(keras.layers.Layer):
    """Figure 5's alternative to nearest neighbours: a 1x1 conv to factor^2 x width channels,
    rearranged into a factor x factor patch per pixel (a transposed conv of stride `factor`)."""

    def __init__(self, width_in, width, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.kernel = self.add_weight(shape=(1, 1, width_in, factor * factor * width), name='kernel',
                                      initializer=_torch_uniform(width_in))
        self.bias = self.add_weight(shape=(factor * factor * width,), initializer='zeros', name='bias')
        self.built = True

    def call(self, x):
        dtype = self.compute_dtype
        return tf.nn.depth_to_space(conv(x, tf.cast(self.kernel, dtype), tf.cast(self.bias, dtype)), self.factor)


class Encoder(keras.layers.Layer):
    """Bottom-up path: in_conv, then the EncBlocks; keeps the last activation per resolution."""

    def __init__(self, hp, layout='stacked', **kwargs):
        super().__init__(**kwargs)
        self.hp, self.width = hp, widths(hp)
        parsed = parse_blocks(hp.enc_blocks)
        self.in_kernel = self.add_weight(shape=(3, 3, hp.image_channels, hp.width), name='in_kernel',
                                         initializer=_torch_uniform(9 * hp.image_channels))
        self.in_bias = self.add_weight(shape=(hp.width,), initializer='zeros', name='in_bias')
        scale, (holder, block_fn) = math.sqrt(1. / len(parsed)), fastgraph.layout(layout)
        self.stages = {}
        for res, n in collections.Counter(res for res, _ in parsed).items():
            w = self.width[res]
            convs = _bottleneck_convs(w, int(w * hp.bottleneck_multiple), w, res > 2, last_scale=scale)
            self.stages[res] = holder(n, _pieces(EncBlock, {'': convs}), name=f'enc{res}')
        self.blocks = [EncBlock(res, down, self.width[res // (down or 1)], row, block_fn, name=f'enc_block{i}')
                       for i, ((res, down), row) in enumerate(zip(parsed, _rows(parsed, self.stages)))]
        self.built = True

    def activations(self, x, remat=False):
        """remat: each block keeps only its input for the backward pass (fastgraph.rematerialised)."""
        dtype = self.compute_dtype
        x = conv(tf.cast(x, dtype), tf.cast(self.in_kernel, dtype), tf.cast(self.in_bias, dtype))
        acts = {self.hp.image_size: x}
        params = {r: s.unstack(dtype) for r, s in self.stages.items()}    # one split per stage
        for block in self.blocks:
            p = params[block.res][block.row.j]
            x = acts[block.res_out] = (rematerialised(lambda x, p, b=block: b(x, params=p), x, p) if remat
                                       else block(x, params=p))
        return acts


def _decoder_pieces(width, hp, n_total, use_3x3):
    """One DecBlock: posterior, prior (last conv zero), z_proj and resnet, with the sqrt(1/N)
    init scaling of z_proj and of resnet's last conv."""
    mid, z, scale = int(width * hp.bottleneck_multiple), hp.zdim, math.sqrt(1. / n_total)
    return _pieces(DecBlock, {'posterior/': _bottleneck_convs(2 * width, mid, 2 * z, use_3x3),
                              'prior/': _bottleneck_convs(width, mid, 2 * z + width, use_3x3, last_scale=0.),
                              'z_proj/': [(1, z, width, scale)],
                              'resnet/': _bottleneck_convs(width, mid, width, use_3x3, last_scale=scale)})


def _rows(blocks, stages):
    """Each block's row of its stage's stack, in block-string order."""
    return [StackRow(stages[res], [r for r, _ in blocks[:i]].count(res)) for i, (res, _) in enumerate(blocks)]


class Decoder(keras.layers.Layer):
    """Top-down path: the initial states, the DecBlocks in dec_blocks order, then gain, bias
    and the DMoL head. layout: VDVAE's."""

    def __init__(self, hp, layout='stacked', **kwargs):
        super().__init__(**kwargs)
        self.hp, self.width = hp, widths(hp)
        parsed, (holder, block_fn) = parse_blocks(hp.dec_blocks), fastgraph.layout(layout)
        self.stages = {res: holder(n, _decoder_pieces(self.width[res], hp, len(parsed), res > 2), name=f'dec{res}')
                       for res, n in collections.Counter(res for res, _ in parsed).items()}
        self.blocks = []
        for i, ((res, mixin), row) in enumerate(zip(parsed, _rows(parsed, self.stages))):
            unpool = (LearnedUnpool(self.width[mixin], self.width[res], res // mixin, name=f'dec_block{i}_unpool')
                      if mixin and hp.unpool == 'learned' else None)
            self.blocks.append(DecBlock(hp, res, mixin, self.width[res], row, unpool, block_fn, name=f'dec_block{i}'))
        self.bias_states = {res: self.add_weight(shape=(1, res, res, self.width[res]),
                                                 initializer='zeros', name=f'bias_state{res}')
                            for res in sorted(self.stages) if res <= hp.no_bias_above}
        self.gain = self.add_weight(shape=(hp.width,), initializer='ones', name='gain')
        self.bias = self.add_weight(shape=(hp.width,), initializer='zeros', name='bias')
        self.out_kernel = self.add_weight(shape=(1, 1, hp.width, 10 * hp.num_mixtures), name='out_kernel',
                                          initializer=_torch_uniform(hp.width))
        self.out_bias = self.add_weight(shape=(10 * hp.num_mixtures,), initializer='zeros', name='out_bias')
        self.built = True

    def initial_state(self, n):
        """{resolution: (n, r, r, w)}: the trainable bias states, zeros above no_bias_above."""
        dtype = self.compute_dtype
        return {r: (tf.broadcast_to(tf.cast(self.bias_states[r], dtype), [n, r, r, self.width[r]])
                    if r in self.bias_states else tf.zeros([n, r, r, self.width[r]], dtype))
                for r in self.stages}

    def top_down(self, n, acts=None, latents=(), temperatures=None, seed=None, noise_rows=None, remat=False):
        """Run every DecBlock in order. With `acts` (the encoder's), z comes from the posterior
        and each layer reports its KL; without, from the prior at `temperatures[i]`. The first
        len(latents) layers use the given latents instead (tensors, or functions of the
        layer's distributions: see DecBlock). Returns (DMoL params, per-layer dicts
        as DecBlock returns them). noise_rows=(offset, total): draw noise for a batch of `total`
        images and use rows offset..offset+n, so a replica's images get the noise they would
        get in one batch. remat (posterior path): each block keeps only its inputs for the
        backward pass (fastgraph.rematerialised)."""
        noise_seeds = _split_seed(seed, len(self.blocks))
        params = {r: s.unstack(self.compute_dtype) for r, s in self.stages.items()}   # one split per stage
        state, layers = self.initial_state(n), []
        for i, block in enumerate(self.blocks):
            noise = functools.partial(_normal, seed=noise_seeds[i], rows=noise_rows)
            p = params[block.res][block.row.j]
            if remat and acts is not None and i >= len(latents):
                inputs = {r: state[r] for r in (block.res, block.mixin) if r is not None}
                state[block.res], layer = rematerialised(
                    lambda inputs, a, p, b=block, noise=noise: b(inputs, acts=a, noise=noise, params=p),
                    inputs, acts[block.res], p)
            else:
                state[block.res], layer = block(
                    state, acts=None if acts is None else acts[block.res],
                    latent=latents[i] if i < len(latents) else None,
                    temperature=1. if temperatures is None else temperatures[i], noise=noise, params=p)
            layers.append(layer)
        return self.likelihood_params(state[self.hp.image_size]), layers

    def likelihood_params(self, x):
        """The image-resolution state -> the DMoL's parameters (B, H, W, 10 M), float32."""
        dtype = self.compute_dtype
        x = x * tf.cast(self.gain, dtype) + tf.cast(self.bias, dtype)
        return tf.cast(conv(x, tf.cast(self.out_kernel, dtype), tf.cast(self.out_bias, dtype)), tf.float32)


# ---------------------------------------------------------------------------------------
class VDVAE(update.KerasSteps, keras.Model):
    """The whole model. `elbo`, `distortion` and `rate` are per-image losses in nats/dim
    (the negative ELBO, as the paper reports it); divide by ln 2 for bits/dim.

    x_in: the preprocessed network input (B, H, W, 3); target: the image in [-1, 1].
    seed: an optional [2] int tensor making every random draw reproducible. compile(), fit()
    and evaluate() train and evaluate it the paper's way (update.KerasSteps)."""

    def __init__(self, hp, remat=False, layout='stacked', **kwargs):
        """remat: the posterior pass keeps only each block's inputs for the backward pass and
        computes the rest again there (less activation memory, more compute; same values).
        layout 'naive': the direct port fastgraph is measured against (fastgraph.layout)."""
        super().__init__(name=kwargs.pop('name', 'vdvae'), **kwargs)
        self.hp, self.remat = hp, remat
        self.encoder = Encoder(hp, layout, name='encoder')
        self.decoder = Decoder(hp, layout, name='decoder')
        self.num_layers = len(self.decoder.blocks)
        self.built = True

    block_convs = staticmethod(block_convs)     # for official.py and bench.py, which take a model

    @classmethod
    def from_preset(cls, preset, cache_dir=None, url=None, **overrides):
        """The paper preset's model holding the official release's EMA weights, downloaded once
        into `cache_dir` (default ~/.keras/vdvae); `url`: another official-format file. Field
        `overrides` change the configuration (the file must fit it)."""
        import hparams
        import official      # the release's files and format: only this needs them
        model = cls(hparams.load(preset, **overrides))
        official.load_file(model, official.fetch(preset, cache_dir, url))
        return model

    def call(self, inputs, seed=None):
        return self.losses_per_image(*inputs, seed=seed)

    def losses_per_image(self, x_in, target, seed=None, noise_rows=None):
        params, layers = self._posterior_pass(x_in, seed, noise_rows)
        distortion = likelihood.dmol_nll(params, target, self.hp.low_bit)
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
        return -likelihood.dmol_nll(params, target, self.hp.low_bit) * self._dims() + tf.add_n(log_ratio)

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

    def decode_images(self, latents, n=None, temperature=1., seed=None, pixels='sample'):
        """uint8 images from decode(); pixels 'sample': drawn from p(x | z) (the paper's
        figures), 'mode': its most likely values (likelihood.dmol_mode). The same seed draws
        the same latents either way."""
        if pixels not in ('sample', 'mode'):
            raise ValueError(f"pixels={pixels!r}: 'sample' or 'mode'")
        seed_z, seed_x = tf.unstack(_split_seed(seed, 2))
        params = self.decode(latents, n, temperature, seed_z)
        return likelihood.dmol_mode(params) if pixels == 'mode' else dmol_sample(params, seed_x)

    def sample(self, n, temperature=1., seed=None, pixels='sample'):
        """n unconditional uint8 images (n, H, W, 3)."""
        return self.decode_images([], n, temperature, seed, pixels)

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
        acts = self.encoder.activations(x_in, self.remat)
        return self.decoder.top_down(tf.shape(x_in)[0], acts=acts, seed=seed, noise_rows=noise_rows,
                                     remat=self.remat)

    def _dims(self):
        return float(self.hp.image_size ** 2 * self.hp.image_channels)


# ---------------------------------------------------------------------------------------
# p(x | z): the discretized mixture of logistics (likelihood.py), drawn from with the model's
# own noise (below).
def dmol_sample(params, seed=None):
    """uint8 images (B, H, W, 3) drawn from the mixture; `seed` a [2] int tensor or None."""
    seeds = _split_seed(seed, 2)
    return likelihood.dmol_sample(params, lambda shape, k: _uniform(shape, seeds[k]))


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


def count_params(model):
    return int(sum(np.prod(v.shape) for v in model.weights))

