"""The discretized mixture of logistics and the Gaussian KL, against the official values,
against an independent slow computation, and against the laws of probability."""
import math
import os

import numpy as np
import pytest
import tensorflow as tf

import likelihood
import model


def test_dmol_nll_and_kl_match_the_official_implementation(official_data):
    g = np.load(os.path.join(official_data, 'golden_dmol_kl.npz'))
    for bits, low_bit in (('8bit', False), ('5bit', True)):
        nll = likelihood.dmol_nll(g[f'params_{bits}'], g[f'target_{bits}'], low_bit=low_bit).numpy()
        np.testing.assert_allclose(nll, g[f'nll_{bits}'], rtol=1e-5)
    kl = model.gaussian_kl(g['kl_q_mean'], g['kl_q_logsigma'], g['kl_p_mean'], g['kl_p_logsigma'])
    np.testing.assert_allclose(kl.numpy(), g['kl'], rtol=1e-5, atol=1e-7)


def _random_params(rng, shape, m, log_scale_range=(-4., 0.5)):
    params = rng.normal(size=shape + (10 * m,)).astype(np.float32)
    rest = params[..., m:].reshape(shape + (3, 3 * m))
    rest[..., m:2 * m] = rng.uniform(*log_scale_range, size=shape + (3, m))
    return np.concatenate([params[..., :m], rest.reshape(shape + (9 * m,))], -1)


def _slow_log_prob(params, pixel, low_bit):
    """log p(pixel) for one pixel, straight from the definition, in float64."""
    m = len(params) // 10
    logits, rest = params[:m].astype(np.float64), params[m:].astype(np.float64).reshape(3, 3 * m)
    h, log_half = (1 / 31, math.log(15.5)) if low_bit else (1 / 255, math.log(127.5))
    sig = lambda v: 0.5 * (1 + math.tanh(0.5 * v))
    softplus = lambda v: max(v, 0) + math.log1p(math.exp(-abs(v)))
    comp = []
    for k in range(m):
        total = logits[k] - (max(logits) + math.log(sum(math.exp(l - max(logits)) for l in logits)))
        for c in range(3):
            mean = rest[c, k]
            log_s = max(rest[c, m + k], -7.)
            if c == 1:
                mean += math.tanh(rest[0, 2 * m + k]) * pixel[0]
            if c == 2:
                mean += math.tanh(rest[1, 2 * m + k]) * pixel[0] + math.tanh(rest[2, 2 * m + k]) * pixel[1]
            x, inv = pixel[c], math.exp(-log_s)
            if x < -0.999:
                lp = inv * (x - mean + h) - softplus(inv * (x - mean + h))
            elif x > 0.999:
                lp = -softplus(inv * (x - mean - h))
            else:
                delta = sig(inv * (x - mean + h)) - sig(inv * (x - mean - h))
                if delta > 1e-5:
                    lp = math.log(delta)
                else:
                    mid = inv * (x - mean)
                    lp = mid - log_s - 2 * softplus(mid) - log_half
            total += lp
        comp.append(total)
    top = max(comp)
    return top + math.log(sum(math.exp(c - top) for c in comp))


@pytest.mark.parametrize('low_bit', [False, True])
def test_dmol_nll_equals_a_slow_per_pixel_computation(low_bit):
    rng = np.random.default_rng(3)
    b, h, w, m = 2, 3, 4, 4
    params = _random_params(rng, (b, h, w), m, (-7.5, 0.))
    levels = 32 if low_bit else 256
    values = rng.integers(0, levels, size=(b, h, w, 3))
    values[0, 0, 0] = [0, levels - 1, 0]                          # edge bins
    target = (values * 2. / (levels - 1) - 1.).astype(np.float32)
    slow = np.array([-sum(_slow_log_prob(params[i, y, x], target[i, y, x], low_bit)
                          for y in range(h) for x in range(w)) / (h * w * 3) for i in range(b)])
    fast = likelihood.dmol_nll(params, target, low_bit=low_bit).numpy()
    np.testing.assert_allclose(fast, slow, rtol=1e-5)


@pytest.mark.parametrize('levels', [256, 32])
def test_probabilities_of_all_pixel_values_sum_to_one(levels):
    """Sum p(r, g, b) over every colour combination, per red value p(r) = sum over (g, b).
    Each colour's factor is normalised given the earlier colours iff these sums hold for
    random means, scales, mixture weights and colour coefficients. 5-bit: on the 32-value
    grid -1 + 2k/31 the likelihood is built for; the official FFHQ-256 targets floor(v/8)*8
    sit slightly off that grid, a quirk the spec keeps."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-1., 1., levels, dtype=np.float32)
    g, b = np.meshgrid(grid, grid, indexing='ij')

    @tf.function
    def log_probs_given_red(params, red):
        target = tf.stack([tf.fill(g.shape, red), g, b], -1)[None]
        return likelihood.dmol_log_probs(tf.broadcast_to(params, (1,) + g.shape + (30,)), target,
                                         low_bit=levels == 32)

    for trial in range(3):
        params = tf.constant(_random_params(rng, (1, 1), 3, (-5., 0.)))
        p_red = np.array([np.exp(log_probs_given_red(params, r).numpy().astype(np.float64)).sum()
                          for r in grid])
        assert abs(p_red.sum() - 1.) < 1e-4, (trial, p_red.sum())
        assert (p_red > 0).all()


def _one_component(means, log_scale, coeffs=(0., 0., 0.), shape=(4, 16, 16), m=1, logits=None):
    """Raw parameters where every pixel has the given component parameters."""
    p = np.zeros(shape + (10 * m,), np.float32)
    rest = p[..., m:].reshape(shape + (3, 3 * m))
    for c in range(3):
        rest[..., c, :m] = means[c]
        rest[..., c, m:2 * m] = log_scale
        rest[..., c, 2 * m:] = np.arctanh(coeffs[c])
    if logits is not None:
        p[..., :m] = logits
    return np.concatenate([p[..., :m], rest.reshape(shape + (9 * m,))], -1)


def test_a_sharp_component_samples_its_mean_with_autoregressive_colours():
    red, green, blue = 100.5, 30.5, 200.5           # bin centres in pixel units
    to_unit = lambda v: v / 127.5 - 1.
    c_g, c_b1, c_b2 = 0.3, -0.2, 0.1
    means = [to_unit(red), to_unit(green) - c_g * to_unit(red),
             to_unit(blue) - c_b1 * to_unit(red) - c_b2 * to_unit(green)]
    images = model.dmol_sample(_one_component(means, -9., (c_g, c_b1, c_b2)), seed=[1, 2]).numpy()
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)
    # scale exp(-7) (the clamp) is 0.12 pixel values: samples stay within a value or two.
    for c, v in enumerate((red, green, blue)):
        assert np.abs(images[..., c].astype(float) - v).max() <= 2
        assert abs(images[..., c].mean() - (v - 0.5)) < 0.1


def test_samples_follow_the_mixture_weights_and_stay_in_range():
    m = 2
    params = _one_component([0., 0., 0.], -1., shape=(8, 32, 32), m=m, logits=0.)
    rest = params[..., m:].reshape(8, 32, 32, 3, 3 * m)
    rest[..., 0, 0], rest[..., 0, 1] = -0.6, 0.6      # red means of the two components
    rest[..., 0, m:2 * m] = -6.                        # sharp red
    params = np.concatenate([np.full((8, 32, 32, m), [0., math.log(3.)], np.float32),
                             rest.reshape(8, 32, 32, 9 * m)], -1)
    images = model.dmol_sample(params, seed=[3, 4]).numpy()
    share_second = (images[..., 0] > 127).mean()       # weights 1/4 and 3/4
    n = images[..., 0].size
    assert abs(share_second - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    wide = model.dmol_sample(_one_component([0.9, -0.9, 0.], 1., shape=(8, 32, 32)), seed=[5, 6]).numpy()
    assert wide.min() == 0 and wide.max() == 255      # clipped, both ends reached


def test_the_mode_image_is_the_dominant_components_coupled_means():
    """dmol_mode: each pixel's most probable component at its mean, green and blue given red
    (and green) through the coefficients, rounded to the nearest of the 256 levels."""
    rng = np.random.default_rng(4)
    m, shape = 3, (2, 8, 8)
    params = _random_params(rng, shape, m)
    logits = rng.normal(0., 1., shape + (m,)).astype(np.float32)
    dominant = rng.integers(0, m, shape)
    np.put_along_axis(logits, dominant[..., None], 20., -1)           # one component dominates
    params[..., :m] = logits
    rest = params[..., m:].reshape(shape + (3, 3 * m))
    pick = lambda block: np.take_along_axis(block, dominant[..., None, None], -1)[..., 0]
    means, coeffs = pick(rest[..., :m]), np.tanh(pick(rest[..., 2 * m:]))
    r = np.clip(means[..., 0], -1, 1)
    g = np.clip(means[..., 1] + coeffs[..., 0] * r, -1, 1)
    b = np.clip(means[..., 2] + coeffs[..., 1] * r + coeffs[..., 2] * g, -1, 1)
    expected = np.round((np.stack([r, g, b], -1) + 1.) * 127.5).astype(np.uint8)
    mode = likelihood.dmol_mode(params).numpy()
    assert mode.dtype == np.uint8 and mode.shape == shape + (3,)
    np.testing.assert_array_equal(mode, expected)
    # The component's scale does not move the mode; a sample from a broad component scatters.
    rest[..., m:2 * m] = 2.
    broad = np.concatenate([params[..., :m], rest.reshape(shape + (9 * m,))], -1)
    np.testing.assert_array_equal(likelihood.dmol_mode(broad).numpy(), expected)
    assert np.abs(model.dmol_sample(broad, seed=[1, 1]).numpy().astype(int) - expected).mean() > 20


def test_the_mode_of_a_sharp_component_is_the_level_it_puts_most_mass_on():
    """Rounding, not the sampler's truncation: a mean a third of a level below level v's
    centre gives v."""
    for level in (0, 1, 66, 127, 128, 254, 255):
        v = (level - 0.3) / 127.5 - 1.
        params = _one_component([v, v, v], -7., shape=(1, 256, 1))
        assert (likelihood.dmol_mode(params).numpy() == level).all(), level
        every_level = np.repeat(np.arange(256, dtype=np.float32)[None, :, None, None] / 127.5 - 1., 3, -1)
        assert int(np.argmax(likelihood.dmol_log_probs(params, every_level).numpy()[0, :, 0])) == level


def test_sampling_is_reproducible_by_seed():
    params = _random_params(np.random.default_rng(1), (2, 8, 8), 5)
    a = model.dmol_sample(params, seed=[7, 7]).numpy()
    assert np.array_equal(a, model.dmol_sample(params, seed=[7, 7]).numpy())
    assert not np.array_equal(a, model.dmol_sample(params, seed=[7, 8]).numpy())


def test_analytic_kl_matches_monte_carlo_and_vanishes_when_q_equals_p():
    rng = np.random.default_rng(2)
    q_mean, p_mean = rng.normal(size=(2, 6)).astype(np.float32)
    q_ls, p_ls = rng.uniform(-1., 0.5, size=(2, 6)).astype(np.float32)
    n = 400_000
    z = q_mean + np.exp(q_ls) * rng.normal(size=(n, 6))
    log_q = -0.5 * ((z - q_mean) / np.exp(q_ls)) ** 2 - q_ls
    log_p = -0.5 * ((z - p_mean) / np.exp(p_ls)) ** 2 - p_ls
    mc, err = (log_q - log_p).mean(0), (log_q - log_p).std(0) / math.sqrt(n)
    analytic = model.gaussian_kl(q_mean, q_ls, p_mean, p_ls).numpy()
    assert np.all(np.abs(analytic - mc) < 4 * err + 1e-6), (analytic, mc, err)
    np.testing.assert_allclose(model.gaussian_kl(q_mean, q_ls, q_mean, q_ls).numpy(), 0., atol=1e-6)


def test_dmol_gradients_stay_finite_for_confident_components_far_from_the_data():
    """Sharp components (log-scale at the -7 clamp) two units away from the target push
    exp(-v) past float32's range; the gradient must stay finite (it once was inf/inf)."""
    rng = np.random.default_rng(4)
    params = _random_params(rng, (2, 4, 4), 3, (-9., -7.))
    rest = params[..., 3:].reshape(2, 4, 4, 3, 9)
    rest[..., :3] = np.where(rng.random((2, 4, 4, 3, 3)) < 0.5, -1., 1.)   # means at the edges
    params = tf.constant(np.concatenate([params[..., :3], rest.reshape(2, 4, 4, 27)], -1))
    target = tf.constant(rng.choice([-1., 1., 0.5], size=(2, 4, 4, 3)).astype(np.float32))
    for low_bit in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(params)
            nll = tf.reduce_sum(likelihood.dmol_nll(params, target, low_bit=low_bit))
        grad = tape.gradient(nll, params).numpy()
        assert np.isfinite(nll.numpy()) and np.all(np.isfinite(grad)), low_bit
