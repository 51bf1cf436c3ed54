"""Lossless coding of images with a trained VDVAE, the library compress.py is the command line
of: bits-back coding with an asymmetric numeral system (BB-ANS, Townsend et al. 2019), top-down
through the hierarchy as HiLLoC (Townsend et al. 2020) does it. A file costs about the model's
negative ELBO.

    blob, stats = coder.compress(model, images)      # uint8 (n, S, S, 3) -> bytes
    images = coder.decompress(model, blob)           # a file's errors: errors.FileError

A batch, on the ANS stack (last in, first out):
    encode: layer by layer, top down: pop z_i with the posterior q(z_i | x, z_<i)  (bits taken)
            push the pixels with p(x | z): red, then green given red, then blue given both
            layer by layer, bottom up: push z_i with the prior p(z_i | z_<i)
    decode: the mirror image: pop z_i with the prior, top down; pop the pixels; then push z_i
            with the posterior, bottom up, which gives back the bits the encoder took.
A latent is an integer u on a grid in units of its prior's scale, z = p_mean + p_sigma * u /
grid: under the prior every u is N(0, grid^2), and both sides compute every distribution from
the same integers. Latent channels whose posterior hardly leaves the prior (mean KL below
`skip_kl` on the images coded; the header lists them) are not coded: both sides put them at the
prior's mean. The first pops need bits on the stack: the file starts with random words, as few
as the pops reached, and batches grow 1, 2, 4, ... up to `batch` so that later pops find bits
left by the earlier images.

Files are exact where the encoder and the decoder compute the same floats: this machine and
TensorFlow build, with the batch sizes the header implies (tested). Another machine or build is
not promised to decode a file (a difference ends in the decoder's end check, one error line,
not in wrong images).
"""
import hashlib
import struct
import time

import numpy as np

import console
import data
import errors
import model as vdvae
import update

CONSTRICTION = 'constriction==0.5.0'
MAGIC, VERSION = b'VDVAEBB', 1
# magic, version, images, image size, batch, layers, zdim, grid, random words left at the
# bottom, sha256 of the weights, sha256 of what follows the header, payload words.
HEADER = struct.Struct('<7sBIHHHHfI32s32sQ')
RANGE = 32            # latents are coded within +-RANGE prior standard deviations
PIXEL_CHUNK = 4096    # pixels per probability table (memory: chunk x 256 x 8 bytes)


def load_constriction():
    try:
        import constriction
    except ImportError:
        console.fail(f'compress.py entropy-codes with the constriction library: pip install {CONSTRICTION}')
    return constriction


# ---------------------------------------------------------------------------------------
# The pixels: the DMoL's bins, one colour at a time given the colours before it.
_EDGES = (2. * np.arange(255) + 1.) / 255. - 1.     # between the 256 bins, in [-1, 1]


class Pixels:
    """p(x | z) of a batch as categorical tables over the 256 values of each sub-pixel,
    exactly as the likelihood bins the mixture (float64; both sides compute the same)."""

    def __init__(self, params):
        p = np.asarray(params, np.float64)
        m = p.shape[-1] // 10
        flat = p.reshape(-1, 10 * m)
        self.shape, self.m = p.shape[:-1], m
        logits = flat[:, :m]
        self.log_pi = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        rest = flat[:, m:].reshape(-1, 3, 3 * m)
        self.means, self.coeffs = rest[..., :m], np.tanh(rest[..., 2 * m:])
        self.inv_scales = np.exp(-np.maximum(rest[..., m:2 * m], -7.))

    def _component_means(self, c, earlier, rows):
        means = self.means[rows, c]
        x = earlier[rows].astype(np.float64) / 127.5 - 1.
        if c == 1:
            means = means + self.coeffs[rows, 0] * x[:, :1]
        elif c == 2:
            means = means + self.coeffs[rows, 1] * x[:, :1] + self.coeffs[rows, 2] * x[:, 1:2]
        return means

    def table(self, c, earlier, rows):
        """(len(rows), 256) probabilities of colour c at the flat pixels `rows`, given
        earlier: (pixels, 3) uint8 with the colours before c filled in."""
        log_w = self.log_pi[rows].copy()
        for k in range(c):        # each component, weighed by how well it explained colour k
            masses = self._masses(k, earlier, rows)
            log_w += np.log(np.maximum(np.take_along_axis(
                masses, earlier[rows, k].astype(np.int64)[:, None, None], axis=2)[..., 0], 1e-300))
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum('pm,pmv->pv', w, self._masses(c, earlier, rows))

    def _masses(self, c, earlier, rows):
        means = self._component_means(c, earlier, rows)
        with np.errstate(over='ignore'):        # exp -> inf gives the cdf's limit, 0
            cdf = 1. / (1. + np.exp(-(_EDGES - means[..., None]) * self.inv_scales[rows, c][..., None]))
        return np.diff(cdf, axis=-1, prepend=0., append=1.)


def push_pixels(coder, pixels, images, c_lib):
    """Encode uint8 (n, S, S, 3) so that pop_pixels gets them back: blue, green, red, each
    in chunks from the last, because the stack gives them back first to last."""
    flat = images.reshape(-1, 3)
    family = c_lib.stream.model.Categorical(perfect=False)
    for c in (2, 1, 0):
        for start in reversed(range(0, len(flat), PIXEL_CHUNK)):
            rows = np.arange(start, min(start + PIXEL_CHUNK, len(flat)))
            coder.encode_reverse(flat[rows, c].astype(np.int32), family, pixels.table(c, flat, rows))


def pop_pixels(coder, pixels, c_lib):
    flat = np.zeros((int(np.prod(pixels.shape)), 3), np.uint8)
    family = c_lib.stream.model.Categorical(perfect=False)
    for c in (0, 1, 2):
        for start in range(0, len(flat), PIXEL_CHUNK):
            rows = np.arange(start, min(start + PIXEL_CHUNK, len(flat)))
            flat[rows, c] = coder.decode(family, pixels.table(c, flat, rows))
    return flat.reshape(*pixels.shape, 3)


# ---------------------------------------------------------------------------------------
# The latents, on a grid in units of each prior's scale.
class Latents:
    def __init__(self, grid, coded, c_lib):
        self.grid, self.coded = float(grid), coded          # coded: (L, zdim) bool
        limit = int(round(RANGE * self.grid))
        self.family = c_lib.stream.model.QuantizedGaussian(-limit, limit)

    def z(self, u, layer):
        """The latent the grid point u stands for: identical floats on both sides."""
        p_mean, p_logsigma = (t.numpy() for t in layer['p'])
        return p_mean + np.exp(p_logsigma) * (u.astype(np.float32) / np.float32(self.grid))

    def posterior(self, layer, i):
        """Mean and standard deviation of q in grid units, at the coded channels of layer i."""
        (p_mean, p_logsigma), (q_mean, q_logsigma) = [
            [t.numpy()[..., self.coded[i]].astype(np.float64) for t in layer[k]] for k in ('p', 'q')]
        return ((q_mean - p_mean) * np.exp(-p_logsigma) * self.grid).ravel(), \
            (np.exp(q_logsigma - p_logsigma) * self.grid).ravel()

    def prior(self, size):
        return np.zeros(size), np.full(size, self.grid)

    def grid_points(self, values, shape, i):
        u = np.zeros(shape, np.int32)
        u[..., self.coded[i]] = values.reshape(*shape[:-1], -1)
        return u


def encode_batch(coder, model, latents, images, c_lib):
    """Push uint8 images (n, S, S, 3); returns the coder's size in bits right after the
    posterior pops (the lowest the stack gets while this batch is coded)."""
    x_in, _ = data.preprocess(images, model.hp)
    acts = model.encoder.activations(x_in)
    popped = []

    def pop(i):
        def choose(layer):
            shape = layer['p'][0].shape
            values = coder.decode(latents.family, *latents.posterior(layer, i)) if latents.coded[i].any() \
                else np.zeros(0, np.int32)
            popped.append(values)
            return latents.z(latents.grid_points(values, shape, i), layer)
        return choose

    params, layers = model.decoder.top_down(len(images), acts=acts, latents=[pop(i) for i in range(model.num_layers)])
    low = coder.num_valid_bits()
    push_pixels(coder, Pixels(params), images, c_lib)
    for values in reversed(popped):
        if len(values):
            coder.encode_reverse(values, latents.family, *latents.prior(len(values)))
    return low


def decode_batch(coder, model, latents, n, c_lib):
    popped, zs = [], []

    def pop(i):
        def choose(layer):
            shape = layer['p'][0].shape
            size = int(np.prod(shape[:-1])) * int(latents.coded[i].sum())
            values = coder.decode(latents.family, *latents.prior(size)) if size else np.zeros(0, np.int32)
            popped.append(values)
            zs.append(latents.z(latents.grid_points(values, shape, i), layer))
            return zs[-1]
        return choose

    params, _ = model.decoder.top_down(n, latents=[pop(i) for i in range(model.num_layers)])
    images = pop_pixels(coder, Pixels(params), c_lib)
    # The posteriors of the latents just decoded: the same floats the encoder popped them with.
    acts = model.encoder.activations(data.preprocess(images, model.hp)[0])
    _, layers = model.decoder.top_down(n, acts=acts, latents=zs)
    for i in reversed(range(model.num_layers)):
        if len(popped[i]):
            coder.encode_reverse(popped[i], latents.family, *latents.posterior(layers[i], i))
    return images


def batches(n, batch):
    """Batch sizes 1, 2, 4, ... up to `batch`, then `batch`, covering n images."""
    sizes, size = [], 1
    while sum(sizes) < n:
        sizes.append(min(size, batch, n - sum(sizes)))
        size = min(2 * size, batch)
    return sizes


def coded_channels(model, images, batch, threshold):
    """(L, zdim) bool: the latent channels whose mean KL (nats per element) over `images`
    reaches `threshold`, the posterior's mean standing in for its draws."""
    total = np.zeros((model.num_layers, model.hp.zdim))
    for start in range(0, len(images), batch):
        x_in, _ = data.preprocess(images[start:start + batch], model.hp)
        _, layers = model.decoder.top_down(len(x_in), acts=model.encoder.activations(x_in),
                                           latents=[lambda layer: layer['q'][0]] * model.num_layers)
        for i, layer in enumerate(layers):
            kl = vdvae.gaussian_kl(*layer['q'], *layer['p']).numpy()
            total[i] += kl.sum(axis=(0, 1, 2)) / (kl.shape[1] * kl.shape[2])
    return total / len(images) >= threshold


def weights_hash(model):
    h = hashlib.sha256()
    for v in sorted(model.weights, key=update.checkpoint_key):
        h.update(update.checkpoint_key(v).encode())
        h.update(np.ascontiguousarray(v.numpy(), '<f4').tobytes())
    return h.digest()


def _initial_words(n):
    """The random words under the first pops. Reversed, so that the n - k of them left once
    k are dropped from the bottom are _initial_words(n - k): the decoder checks it ends there."""
    words = np.random.RandomState(20201120).randint(1, 2 ** 32, size=n, dtype=np.uint64)
    return words.astype(np.uint32)[::-1].copy()


# ---------------------------------------------------------------------------------------
# Files.
def compress(model, images, batch=4, grid=2., skip_kl=1e-2, progress=True):
    """uint8 (n, S, S, 3) -> the bytes of a file; and a dict of what it measured."""
    c_lib = load_constriction()
    grid = float(np.float32(grid))            # as the header stores it, so both sides use it
    coded = coded_channels(model, images, batch, skip_kl) if skip_kl > 0 else \
        np.ones((model.num_layers, model.hp.zdim), bool)
    latents = Latents(grid, coded, c_lib)
    sizes, t0 = batches(len(images), batch), time.time()
    # Random words under the first pops; a run that reaches the bottom starts again with more,
    # then the words no pop reached are dropped (the pops take from the top only).
    words = 4096
    while True:
        coder = c_lib.stream.stack.AnsCoder(_initial_words(words))
        low, start = [], 0
        for size in sizes:
            low.append(encode_batch(coder, model, latents, images[start:start + size], c_lib))
            start += size
            if progress:
                console.progress('compressing', start, len(images), t0, every=30.)
            if min(low) < 64:
                break
        if min(low) >= 64:
            break
        words *= 4
    drop = max(0, min(low) // 32 - 2)
    payload = coder.get_compressed()[drop:]
    body = coded.astype(np.uint8).tobytes() + payload.astype('<u4').tobytes()
    header = HEADER.pack(MAGIC, VERSION, len(images), model.hp.image_size, batch, model.num_layers,
                         model.hp.zdim, grid, words - drop, weights_hash(model),
                         hashlib.sha256(body).digest(), len(payload))
    seconds = time.time() - t0
    return header + body, dict(initial_bits=32 * (words - drop), coded_channels=int(coded.sum()),
                               seconds=seconds, images_per_second=len(images) / seconds)


def read_header(blob, name):
    if len(blob) < HEADER.size or blob[:len(MAGIC)] != MAGIC:
        raise errors.FileError(f'{name}: not a file written by compress.py')
    fields = HEADER.unpack(blob[:HEADER.size])
    if fields[1] != VERSION:
        raise errors.FileError(f'{name}: format version {fields[1]}; this compress.py reads version {VERSION}')
    return dict(zip(('magic', 'version', 'n', 'size', 'batch', 'layers', 'zdim', 'grid', 'initial_words',
                     'weights', 'checksum', 'words'), fields))


def decompress(model, blob, name='file', progress=True):
    """The bytes of a file -> uint8 (n, S, S, 3)."""
    c_lib = load_constriction()
    h = read_header(blob, name)
    mask_bytes = h['layers'] * h['zdim']
    expected = HEADER.size + mask_bytes + 4 * h['words']
    if len(blob) < expected:
        raise errors.FileError(f'{name}: truncated: {len(blob):,} of {expected:,} bytes')
    body = blob[HEADER.size:expected]
    if hashlib.sha256(body).digest() != h['checksum'] or len(blob) > expected:
        raise errors.FileError(f'{name}: corrupt: its checksum does not match its contents')
    if (h['size'], h['layers'], h['zdim']) != (model.hp.image_size, model.num_layers, model.hp.zdim) \
            or h['weights'] != weights_hash(model):
        raise errors.FileError(f'{name} was compressed with another model (its weights hash differs from '
                               'this checkpoint\'s): pass the --ckpt it was made with')
    coded = np.frombuffer(body[:mask_bytes], np.uint8).reshape(h['layers'], h['zdim']).astype(bool)
    coder = c_lib.stream.stack.AnsCoder(np.frombuffer(body[mask_bytes:], '<u4').astype(np.uint32))
    latents = Latents(h['grid'], coded, c_lib)
    sizes, out, t0 = batches(h['n'], h['batch']), [], time.time()
    for size in reversed(sizes):
        out.append(decode_batch(coder, model, latents, size, c_lib))
        if progress:
            console.progress('decompressing', sum(len(o) for o in out), h['n'], t0, every=30.)
    if not np.array_equal(coder.get_compressed(), _initial_words(h['initial_words'])):
        raise errors.FileError(f'{name}: decoding did not end where the encoder began; the file was made '
                               'on another machine or TensorFlow build, whose floats differ')
    return np.concatenate(out[::-1])
