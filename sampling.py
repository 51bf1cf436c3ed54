"""Sampling and looking inside the hierarchy, as library functions: temperature schedules, the
compiled sampler, reconstructions from the first k posterior latents, the rate per layer and
the training preview grid. sample.py is their command line; train.py draws its previews here.
"""
import math
import time

import numpy as np
import tensorflow as tf

from figures import grid, labelled, titled
import console

# ---------------------------------------------------------------------------------------
# Temperatures.


def parse_temperatures(spec, model):
    """--temp text -> [(label, float or (num_layers,) float32 array)], one per grid row."""
    rows = spec.split(';') if ';' in spec or ':' in spec else spec.split(',')
    return [(row.strip(), _schedule(row.strip(), model)) for row in rows]


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'--temp: {text!r} is not a number') from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f'--temp: {text} must be a finite number >= 0')
    return value


def _schedule(row, model):
    kind, _, rest = row.partition(':')
    resolutions = np.array([b.res for b in model.decoder.blocks])
    if not rest:
        return _number(kind)
    if kind == 'ramp':
        ends = rest.split(':')
        if len(ends) != 2:
            raise ValueError(f'--temp: {row!r}; a ramp is ramp:FIRST:LAST')
        return np.linspace(_number(ends[0]), _number(ends[1]), model.num_layers).astype(np.float32)
    if kind == 'layers':
        values = [_number(v) for v in rest.split(',')]
        model.temperatures(values)       # the one place that checks the length
        return np.array(values, np.float32)
    if kind == 'res':
        out = np.ones(model.num_layers, np.float32)
        for item in rest.split(','):
            res, eq, value = item.partition('=')
            if not eq or not res.strip().isdigit() or int(res) not in resolutions:
                raise ValueError(f'--temp: {item!r} must be RES=VALUE with RES one of the '
                                 f'decoder\'s resolutions {sorted(set(resolutions.tolist()))}')
            out[resolutions == int(res)] = _number(value)
        return out
    raise ValueError(f'--temp: unknown form {kind!r}; see --help (ramp:, res:, layers:)')


# ---------------------------------------------------------------------------------------
# The figures' computations.


def make_sampler(model, jit_compile=False, pixels='sample'):
    """(n, temperature, seed) -> uint8 images. The prior path only, one compiled graph per
    batch size; temperatures are a tensor, so every schedule reuses the graph. jit_compile:
    one XLA program per batch size (as on a TPU). pixels: 'sample' or 'mode' (model.sample)."""
    graph = tf.function(lambda n, temperatures, seed: model.sample(n, temperatures, seed, pixels),
                        autograph=False, reduce_retracing=False, jit_compile=jit_compile or None)

    def sample(n, temperature, seed):
        return graph(n, model.temperatures(temperature), tf.constant(seed, tf.int32))
    sample.graph = graph
    return sample


def generate(sampler, n, temperature, seed, batch, timings=None):
    """n images in batches; batch i uses seed (seed, i), so the same seed gives the same images."""
    out, start_time = [], time.time()
    for i, start in enumerate(range(0, n, batch)):
        t0 = time.time()
        out.append(sampler(min(batch, n - start), temperature, [seed, i]).numpy())
        if timings is not None:
            timings.append((len(out[-1]), time.time() - t0))
        if n > batch:
            console.progress('sampling', start + len(out[-1]), n, start_time, every=30.)
    return np.concatenate(out)


def latent_share(model):
    """Cumulative share of the latent dimensions held by the first k layers, k = 1..L."""
    dims = np.array([b.res ** 2 * model.hp.zdim for b in model.decoder.blocks], np.float64)
    return np.cumsum(dims) / dims.sum()


def default_keep(model):
    L = model.num_layers
    return sorted({max(1, L * f // 8) for f in (0, 1, 2, 4, 6, 8)})


def reconstructions(model, x_in, keep, temperature=0.1, seed=0, pixels='sample'):
    """For each k in `keep`: images decoded from the first k posterior latents of x_in, the
    remaining layers drawn from the prior at `temperature`."""
    latents = model.posterior_latents(x_in, seed=[seed, 0])
    return [model.decode_images(latents[:k], temperature=temperature, seed=[seed, k], pixels=pixels).numpy()
            for k in keep]


def rate_per_layer(model, x_in, batch, seed=0):
    """(num_layers,) average KL of each decoder layer in bits/dim over the images x_in."""
    graph = tf.function(lambda x, s: model.rate_per_layer(x, seed=s), autograph=False)
    rates, t0 = [], time.time()
    for i in range(0, len(x_in), batch):
        rates.append(graph(x_in[i:i + batch], tf.constant([seed, i], tf.int32)).numpy())
        if len(x_in) > batch:
            console.progress('rate per layer', i + len(rates[-1]), len(x_in), t0, every=30.)
    return np.concatenate(rates).mean(0) / math.log(2)


def sample_grid(model, x_in, target, temperatures=(1.0, 0.9, 0.8), seed=0, title=None):
    """The training preview. Rows: data; reconstructions from the first 1, L/4, L/2 and L
    posterior latents (the rest at temperature 0.1), then the last of them with the most likely
    pixels ('mode'); samples at each temperature, each followed by the same latents' mode
    row. Sampled pixels are what the likelihood scores, mode rows what a reader recognises
    early in training, when each pixel's distribution is still broad. `title`: a line above it."""
    L = model.num_layers
    keep = sorted({1, L // 4, L // 2, L} - {0})
    # The data row rounds: to_uint8 truncates like the official sampler, which would turn
    # 66 / 127.5 - 1 back into 65.
    data_row = np.round((np.asarray(target) + 1.) * 127.5).astype(np.uint8)
    share = latent_share(model)
    rows = [data_row] + reconstructions(model, x_in, keep, 0.1, seed)
    rows += reconstructions(model, x_in, [L], 0.1, seed, pixels='mode')
    labels = ['data'] + [f'k={k} ({100 * share[k - 1]:.3g}%)' for k in keep] + [f'k={L}, mode']
    for i, t in enumerate(temperatures):
        rows += [model.sample(len(x_in), t, [seed, 1000 + i], pixels).numpy() for pixels in ('sample', 'mode')]
        labels += [f't={t}', f't={t}, mode']
    size = model.hp.image_size
    image = labelled(grid(np.stack(rows)), left=labels, cell=(size, size), scale=max(1, 64 // size))
    return titled(image, f'{title}; "mode" rows: most likely pixels, the others sampled') if title else image
