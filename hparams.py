"""Hyperparameters: one typed record, the paper's presets, and absl flags to override any field.

    python train.py --hparams=imagenet32 --width=256 --dec_blocks=1x2,4m1,...

Every field of `HParams` is a flag of the same name. `load(name, **overrides)` is the
library entry point; `from_flags()` is what the scripts call. Both validate, so a block
string that does not parse or a decoder that cannot run fails at start-up, in one line.
"""
import dataclasses
import math
import re
import sys

from absl import flags

from errors import HParamsError


@dataclasses.dataclass(frozen=True)
class HParams:
    # Data.
    dataset: str = 'cifar10'
    image_size: int = 32
    image_channels: int = 3
    low_bit: bool = False            # 5-bit likelihood (the paper's FFHQ-256)
    # Architecture (paper figure 3 and table 4).
    width: int = 384
    custom_width_str: str = ''       # 'res:width,...'; unlisted resolutions use `width`
    zdim: int = 16
    bottleneck_multiple: float = 0.25
    num_mixtures: int = 10
    no_bias_above: int = 64          # trainable initial decoder states up to this resolution
    unpool: str = 'nearest'          # figure 5: 'nearest' (the paper's model) or 'learned'
    top_down_block: str = 'res'      # figure 5: 'res' (the paper's model) or 'ffn' (no residual)
    enc_blocks: str = ''
    dec_blocks: str = ''
    # Optimisation.
    lr: float = 2e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.9
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_iters: int = 100
    ema_rate: float = 0.9999
    grad_clip: float = 200.0
    skip_threshold: float = 400.0    # -1: never skip on the gradient norm (the official convention)
    batch_size: int = 16             # per replica
    steps: int = 10_000_000          # training updates (the paper trained until converged)
    seed: int = 0

    def replace(self, **changes):
        return validate(dataclasses.replace(self, **changes))


_PAPER = dict(zdim=16, bottleneck_multiple=0.25, num_mixtures=10, no_bias_above=64)

PRESETS = {
    'cifar10': HParams(
        dataset='cifar10', image_size=32, width=384, lr=2e-4, batch_size=16, ema_rate=0.9999,
        grad_clip=200, skip_threshold=400, **_PAPER,
        enc_blocks='32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3',
        dec_blocks='1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21'),
    'imagenet32': HParams(
        dataset='imagenet32', image_size=32, width=512, lr=1.5e-4, batch_size=8, ema_rate=0.999,
        grad_clip=200, skip_threshold=300, **_PAPER,
        enc_blocks='32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6',
        dec_blocks='1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40'),
    'imagenet64': HParams(
        dataset='imagenet64', image_size=64, width=512, lr=1.5e-4, batch_size=4, ema_rate=0.999,
        grad_clip=220, skip_threshold=380, **_PAPER,
        enc_blocks='64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5',
        dec_blocks='1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12'),
    'ffhq256': HParams(
        dataset='ffhq256', image_size=256, width=512, lr=1.5e-4, batch_size=1, ema_rate=0.999,
        grad_clip=130, skip_threshold=180, low_bit=True, **_PAPER,
        enc_blocks='256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4',
        dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128'),
    'ffhq1024': HParams(
        dataset='ffhq1024', image_size=1024, width=16, lr=7e-5, batch_size=1, ema_rate=0.999,
        grad_clip=360, skip_threshold=500, **dict(_PAPER, num_mixtures=2),
        custom_width_str='512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512',
        enc_blocks='1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,'
                   '16x7,16d2,8x5,8d2,4x5,4d4,1x4',
        dec_blocks='1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,'
                   '256m128,256x2,512m256,1024m512'),
    # Small configurations: `tiny` is the shape of the official test case (unit tests),
    # `demo` trains on real MNIST digits on a laptop CPU in minutes.
    'tiny': HParams(
        dataset='mnist5k', image_size=16, width=32, zdim=4, num_mixtures=3, lr=1e-3,
        batch_size=8, ema_rate=0.99, steps=200, grad_clip=200, skip_threshold=1000,
        enc_blocks='16x2,16d2,8x2,8d2,4x2,4d4,1x1',
        dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8,16x2'),
    'demo': HParams(
        dataset='mnist5k', image_size=32, width=64, zdim=8, num_mixtures=5, lr=1e-3,
        batch_size=32, ema_rate=0.99, steps=400, grad_clip=200, skip_threshold=1000,
        enc_blocks='32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1',
        dec_blocks='1x1,4m1,4x2,8m4,8x2,16m8,16x3,32m16,32x2'),
}


# ---------------------------------------------------------------------------------------
# Block strings: 'RxN' N blocks at R, 'RdK' one block at R then pool by K, 'RmM' one block at
# R mixing in the upsampled state of resolution M, bare 'R' one block.
_TOKEN = re.compile(r'^(\d+)(?:([xdm])(\d+))?$')


def parse_blocks(s, field='blocks'):
    """'32x2,32d2' -> [(32, None), (32, None), (32, 2)]: (resolution, down rate or mixin)."""
    blocks = []
    for token in s.split(','):
        m = _TOKEN.match(token.strip())
        if not m:
            raise HParamsError(f'{field}: cannot parse block {token!r} in {s!r} '
                               "(expected 'R', 'RxN', 'RdK' or 'RmM', e.g. '32x4,32d2,16m8')")
        res, kind, n = int(m[1]), m[2], int(m[3]) if m[3] else None
        if res < 1 or (n is not None and n < 1):
            raise HParamsError(f'{field}: block {token!r} needs positive numbers')
        if kind == 'x':
            blocks += [(res, None)] * n
        else:
            blocks.append((res, n))
    return blocks


def widths(hp):
    """Resolution -> channel width for every resolution the model uses (custom_width_str
    overrides `width` per resolution)."""
    table = {}
    for item in filter(None, hp.custom_width_str.split(',')):
        try:
            res, w = (int(v) for v in item.split(':'))
        except ValueError:
            raise HParamsError(f"custom_width_str: cannot parse {item!r} (expected 'res:width,...')")
        if w < 1:
            raise HParamsError(f'custom_width_str: width {w} at resolution {res} must be at least 1')
        table[res] = w
    used = {hp.image_size}
    for res, down in parse_blocks(hp.enc_blocks, 'enc_blocks'):
        used |= {res, res // (down or 1)}
    for res, mixin in parse_blocks(hp.dec_blocks, 'dec_blocks'):
        used |= {res, mixin or res}
    unused = sorted(set(table) - used)
    if unused:       # most likely a typo: it would change nothing
        raise HParamsError(f'custom_width_str: the model has no resolution {unused[0]} '
                           f'(its resolutions: {", ".join(map(str, sorted(used)))})')
    return {res: table.get(res, hp.width) for res in sorted(used)}


def encoder_resolutions(hp):
    """The resolution each encoder block works at, checked to follow from the image size."""
    blocks, res = parse_blocks(hp.enc_blocks, 'enc_blocks'), hp.image_size
    for r, down in blocks:
        if r != res:
            raise HParamsError(f'enc_blocks: a block at resolution {r} follows resolution {res} '
                               f'(the encoder starts at image_size={hp.image_size} and only '
                               "'RdK' blocks change resolution)")
        if down is not None:
            if res % down:
                raise HParamsError(f'enc_blocks: {r}d{down} does not divide {r}')
            res //= down
    return blocks


def validate(hp):
    for f in dataclasses.fields(hp):
        v = getattr(hp, f.name)
        if f.type in ('float', float) and not math.isfinite(v):
            raise HParamsError(f'{f.name}={v} must be a finite number')
        if f.type in ('int', 'float', int, float) and f.name not in ('seed', 'skip_threshold') and v < 0:
            raise HParamsError(f'{f.name}={v} must not be negative')
    if hp.skip_threshold <= 0 and hp.skip_threshold != -1:
        raise HParamsError(f'skip_threshold={hp.skip_threshold} must be positive, or -1: never skip on '
                           'the gradient norm (non-finite steps are still skipped)')
    for name in ('image_size', 'width', 'zdim', 'num_mixtures', 'batch_size', 'image_channels', 'steps'):
        if getattr(hp, name) < 1:
            raise HParamsError(f'{name}={getattr(hp, name)} must be at least 1')
    if not 0 <= hp.ema_rate < 1 or not 0 <= hp.adam_beta1 < 1 or not 0 <= hp.adam_beta2 < 1:
        raise HParamsError('ema_rate, adam_beta1 and adam_beta2 must lie in [0, 1)')
    for name, choices in (('unpool', ('nearest', 'learned')), ('top_down_block', ('res', 'ffn'))):
        if getattr(hp, name) not in choices:
            raise HParamsError(f'{name}={getattr(hp, name)!r}: choose {" or ".join(map(repr, choices))}')
    if hp.image_channels != 3:
        raise HParamsError('image_channels must be 3 (the DMoL likelihood is over RGB)')
    width = widths(hp)
    enc_blocks = encoder_resolutions(hp)
    enc_res = {hp.image_size} | {r // (d or 1) for r, d in enc_blocks}
    seen = set()
    for res, mixin in parse_blocks(hp.dec_blocks, 'dec_blocks'):
        if res not in enc_res:
            raise HParamsError(f'dec_blocks: resolution {res} has no encoder activation '
                               f'(encoder resolutions: {sorted(enc_res)})')
        if mixin is not None:
            if mixin not in seen:
                raise HParamsError(f'dec_blocks: {res}m{mixin} mixes in resolution {mixin}, '
                                   f'which no earlier decoder block produced (so far: {sorted(seen)})')
            if mixin >= res or res % mixin:
                raise HParamsError(f'dec_blocks: {res}m{mixin} must upsample by a whole factor')
            if width[mixin] < width[res]:
                raise HParamsError(f'dec_blocks: {res}m{mixin} needs width[{mixin}] >= '
                                   f'width[{res}], got {width[mixin]} < {width[res]}')
        if int(width[res] * hp.bottleneck_multiple) < 1:
            raise HParamsError(f'bottleneck_multiple={hp.bottleneck_multiple} leaves no channels '
                               f'at resolution {res}')
        seen.add(res)
    top = parse_blocks(hp.dec_blocks)[-1][0]
    if top != hp.image_size:
        raise HParamsError(f'dec_blocks: the decoder ends at resolution {top}, '
                           f'but image_size={hp.image_size}')
    if width[hp.image_size] != hp.width:
        raise HParamsError(f'custom_width_str: the image resolution {hp.image_size} must use the '
                           f'base width {hp.width} (the output head reads it)')
    return hp


def load(name, **overrides):
    """A validated preset with some fields changed, e.g. load('cifar10', width=128)."""
    if name not in PRESETS:
        raise HParamsError(_unknown_preset(name))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(HParams)})
    if unknown:
        raise HParamsError(f'unknown hyperparameter(s) {", ".join(unknown)}; valid: '
                           + ', '.join(f.name for f in dataclasses.fields(HParams)))
    return validate(dataclasses.replace(PRESETS[name], **overrides))


# ---------------------------------------------------------------------------------------
# Flags: --hparams=NAME plus one flag per field, None meaning "the preset's value".
# What each field means, for --help (the presets' values are added there).
MEANING = {
    'dataset': 'data: cifar10, imagenet32, imagenet64, ffhq256, ffhq1024, mnist5k (offline digits), '
               'folder:PATH (a folder of PNG/JPEG/BMP/WebP images) or npy:PATH (an (N, S, S, 3) uint8 .npy)',
    'image_size': 'image side in pixels',
    'image_channels': 'colour channels (3: the likelihood is over RGB)',
    'low_bit': 'model 5-bit pixels (the paper\'s FFHQ-256)',
    'width': 'channels of the residual stream (every resolution not in custom_width_str)',
    'custom_width_str': 'other widths per resolution, RES:WIDTH,... e.g. 512:32,256:64 (empty: all use width)',
    'zdim': 'channels of each latent z (a layer at resolution r has r*r*zdim latents)',
    'bottleneck_multiple': 'inner width of a residual bottleneck block, as a fraction of width',
    'num_mixtures': 'logistic components of the discretized-mixture likelihood',
    'no_bias_above': 'the top-down path starts from a trainable state at resolutions up to this one',
    'enc_blocks': 'encoder blocks, bottom-up: RxN = N residual blocks at resolution R, RdK = one '
                  'block then average-pool by K, e.g. 32x11,32d2,16x6,16d2',
    'dec_blocks': 'decoder (top-down) blocks, each a stochastic layer: RxN = N blocks at resolution '
                  'R, RmS = one block at R that upsamples resolution S (see unpool), e.g. '
                  '1x1,4m1,4x2,8m4',
    'unpool': 'how an RmS decoder block upsamples resolution S: nearest (nearest neighbour, the '
              'paper\'s model) or learned (a 1x1 conv and depth-to-space; figure 5 compares them)',
    'top_down_block': 'the res block closing each decoder block: res (residual, the paper\'s model) '
                      'or ffn (the same convs without the residual connection; figure 5\'s "FFN")',
    'lr': 'AdamW learning rate after the warm-up',
    'adam_beta1': 'AdamW beta1',
    'adam_beta2': 'AdamW beta2',
    'adam_eps': 'AdamW epsilon, added to the bias-corrected sqrt(v) as the official optimizer does',
    'weight_decay': 'AdamW decoupled weight decay',
    'warmup_iters': 'steps of linear learning-rate warm-up (skipped steps count)',
    'ema_rate': 'rate of the exponential moving average of the weights (what evaluation and '
                'sampling use)',
    'grad_clip': 'clip the global gradient norm to this',
    'skip_threshold': 'skip the whole update when the global gradient norm is at or above this '
                      '(-1: never on the norm; non-finite steps are always skipped)',
    'batch_size': 'images per replica per step (the global batch is this times the replicas)',
    'steps': 'training updates in all (a resumed run goes on to this)',
    'seed': 'seed of the initial weights, the data order and the noise',
}


def _preset_values(name):
    """'cifar10 384, imagenet32 512, ...' for a field whose presets differ, '384 in every
    preset' where they agree; None for long strings (their syntax is in MEANING)."""
    values = {p: getattr(hp, name) for p, hp in PRESETS.items()}
    if any(isinstance(v, str) and len(v) > 24 for v in values.values()):
        return None
    if len(set(values.values())) == 1:
        return f'{next(iter(values.values()))!r} in every preset'.replace("''", 'empty')
    return ', '.join(f'{p} {v!r}' for p, v in values.items()).replace("''", 'empty')


def define_flags(default='demo', flag_values=flags.FLAGS):
    # Registered as the calling script's own flags, so that its --help lists them (absl's
    # --help shows only the main module's, which absl names by sys.argv[0]).
    caller = sys._getframe(1).f_globals.get('__name__')
    main = sys.argv[0] if caller == '__main__' else caller
    flags.DEFINE_string('hparams', default, f'preset: one of {", ".join(PRESETS)} (the paper\'s five, '
                        '`tiny`: the shape of the official test case, `demo`: MNIST digits in minutes); '
                        'every field below overrides it', flag_values=flag_values, module_name=main)
    for f in dataclasses.fields(HParams):
        kind = {'int': flags.DEFINE_integer, 'float': flags.DEFINE_float,
                'bool': flags.DEFINE_boolean, 'str': flags.DEFINE_string}[_typename(f)]
        values = _preset_values(f.name)
        kind(f.name, None, MEANING[f.name] + (f'. Presets: {values}' if values else '') + '. Default: the preset\'s',
             flag_values=flag_values, module_name=main)


def _typename(field):
    return field.type if isinstance(field.type, str) else field.type.__name__


def _unknown_preset(name):
    return f'unknown preset {name!r}; choose one of: {", ".join(PRESETS)}'


def from_flags(flag_values=None):
    fv = flag_values or flags.FLAGS
    if fv.hparams not in PRESETS:       # named by its flag, as the other flags' errors are
        raise HParamsError(f'--hparams: {_unknown_preset(fv.hparams)}')
    overrides = {f.name: fv[f.name].value for f in dataclasses.fields(HParams)
                 if fv[f.name].value is not None}
    return load(fv.hparams, **overrides)


# The fields by what they set: the headings of a script's --help (with its own flags added).
FIELD_GROUPS = {
    'preset and data': ['hparams', 'dataset', 'image_size', 'image_channels', 'low_bit'],
    'architecture (the paper\'s figure 3 and table 4)': [
        'width', 'custom_width_str', 'zdim', 'bottleneck_multiple', 'num_mixtures', 'no_bias_above',
        'unpool', 'top_down_block', 'enc_blocks', 'dec_blocks'],
    'optimiser (the update rule)': ['lr', 'adam_beta1', 'adam_beta2', 'adam_eps', 'weight_decay',
                                    'warmup_iters', 'ema_rate', 'grad_clip', 'skip_threshold', 'batch_size'],
    'training loop': ['steps', 'seed'],
}
