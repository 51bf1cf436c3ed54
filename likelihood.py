"""p(x | z_1..z_L), the last box of figure 3: the discretized mixture of logistics (Salimans et
al., 2017, as the official code has it) over 8-bit (or 5-bit) pixels, on the decoder's raw
output (B, H, W, 10 M): channels [0:M] are the mixture's logits, then per colour c
[means M | log_scales M | coeffs M]. Its negative log-likelihood per dimension is the paper's
distortion (model.py adds the rate).
"""
import math

import tensorflow as tf


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


def dmol_sample(params, uniform):
    """uint8 images (B, H, W, 3) drawn from the mixture; `uniform(shape, k)` gives noise in
    (0, 1) for draw k: 0 picks each pixel's component, 1 its logistic noise."""
    logits, *split = _dmol_split(tf.cast(params, tf.float32))
    u = uniform(tf.shape(logits), 0)
    pick = tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1)     # Gumbel-max
    means, log_scales, coeffs = _component(split, pick)
    u = uniform(tf.shape(means), 1)
    return to_uint8(_coupled(means + tf.exp(log_scales) * (tf.math.log(u) - tf.math.log(1. - u)), coeffs))


def dmol_mode(params):
    """uint8 images (B, H, W, 3): each pixel's most probable component at its mean, green and
    blue shifted by red (and green) as the likelihood couples them, rounded to the nearest
    level. No noise: what the decoder thinks the image is, where a sample adds the
    logistic's spread (broad early in training)."""
    logits, *split = _dmol_split(tf.cast(params, tf.float32))
    means, _, coeffs = _component(split, tf.argmax(logits, axis=-1))
    return tf.cast(tf.round(tf.clip_by_value((_coupled(means, coeffs) + 1.) * 127.5, 0., 255.)), tf.uint8)


def _component(split, pick):
    """The means, log-scales and coefficients (B, H, W, 3) of component `pick` (B, H, W);
    `split`: those three of _dmol_split, for every component."""
    one_hot = tf.one_hot(pick, split[0].shape[-1])[..., None, :]
    return [tf.reduce_sum(v * one_hot, -1) for v in split]


def _coupled(x, coeffs):
    """Per-colour values x (B, H, W, 3) -> pixels in [-1, 1]: green gets coeffs[0] x red, blue
    coeffs[1] x red + coeffs[2] x green, each clipped before the next colour sees it."""
    r = tf.clip_by_value(x[..., 0], -1., 1.)
    g = tf.clip_by_value(x[..., 1] + coeffs[..., 0] * r, -1., 1.)
    b = tf.clip_by_value(x[..., 2] + coeffs[..., 1] * r + coeffs[..., 2] * g, -1., 1.)
    return tf.stack([r, g, b], axis=-1)


def to_uint8(x):
    """[-1, 1] -> uint8, truncating like the official sampler."""
    return tf.cast(tf.clip_by_value((x + 1.) * 127.5, 0., 255.), tf.uint8)
