"""What the commands say on the console and how they end: absl's app.run with one-line flag
errors (`run`), --help under headings (`grouped_help`), the one-line `error:` exit (`fail`,
`exit_on_error`, `at_least`), progress lines (`progress`, `fresh_line`), and what accelerator
this machine shows (`tpu_present`, `nvidia_driver`; no TensorFlow needed, so that a notebook
may ask before installing it).

    console.run(main)                       # the last line of every command
    console.fail(f'--n={n} must be positive')   # error: --n=0 must be positive, exit status 2
"""
import glob
import os
import shutil
import sys
import time

from absl import flags

import errors

# Flags whose '' is a value (run refuses any other string flag given empty): hparams'
# custom_width_str, where it means that every resolution uses `width`.
EMPTY_IS_A_VALUE = {'custom_width_str'}
HELP = ('--help', '-help', '--helpshort', '-helpshort', '-?')


def grouped_help(doc, groups):
    """A script's --help with its flags under headings (`groups`: heading -> flag names); flags
    of the script's own that no heading names come last, so none is left out."""
    listed = {name for names in groups.values() for name in names}
    own = sorted({f.name for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])} - listed)
    parts = [(doc or '').rstrip() + '\n\nflags (--helpfull: every flag, absl\'s too):']
    for heading, names in list(groups.items()) + [('other', own)]:
        if names:
            group = flags.FlagValues()
            for name in names:
                group[name] = flags.FLAGS[name]
            parts.append(f'\n{heading}:\n' + group.get_help(prefix='  ', include_special_flags=False))
    return '\n'.join(parts) + '\n'


def run(main):
    """absl's app.run, with flag errors (unknown flag, bad value) as one line and exit status 2.
    A script with HELP_GROUPS (heading -> flag names) shows its --help under those headings."""
    from absl import app
    script = sys.modules[main.__module__]

    def parse(argv):
        groups = getattr(script, 'HELP_GROUPS', None)
        if groups and any(arg in HELP for arg in argv[1:]):
            print(grouped_help(script.__doc__, groups), end='')
            sys.exit(1)         # as absl's --help
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            fail(e)
        for module, defined in flags.FLAGS.flags_by_module_dict().items():
            for flag in defined:      # e.g. --logdir=$RUN with RUN unset
                if (flag.present and flag.value == '' and flag.flag_type() == 'string'
                        and flag.name not in EMPTY_IS_A_VALUE and not module.startswith('absl')):
                    fail(f'--{flag.name} is empty; give a value or leave it out')
        return rest
    app.run(main, flags_parser=parse)


def exit_on_error(fn, *args, **kwargs):
    """Run fn; an HParamsError becomes one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except errors.HParamsError as e:
        fail(e)


def tpu_present():
    """A TPU VM shows its chips as /dev/accel* (v2 to v4) or /dev/vfio/N (v5e on); TPU_NAME
    names a remote one. (Here, not in train.py, so a notebook can ask before TF is installed.)"""
    return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') or os.environ.get('TPU_NAME'))


def nvidia_driver():
    """Where this machine shows an NVIDIA driver (nvidia-smi on PATH, or /proc/driver/nvidia),
    else None. (Here, as tpu_present, so a notebook can ask before TF is installed.)"""
    return shutil.which('nvidia-smi') or ('/proc/driver/nvidia' if os.path.exists('/proc/driver/nvidia') else None)


def progress(label, done, total, t0, every=0.):
    """A bar, the rate and the time left. On a terminal one line, redrawn in place; elsewhere
    (a log file, nohup, a notebook) whole lines: at most one per `every` seconds, and the last."""
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    bar = '#' * int(30 * done / max(total, 1))
    line = f'{label} [{bar:<30}] {int(done)}/{int(total)} {rate:.1f}/s eta {eta / 60:.1f} min'
    if sys.stderr.isatty():
        end = '\n' if done >= total else ''
        print('\r' + line, end=end, file=sys.stderr, flush=True)
        _line_open[0] = not end
    elif done >= total or time.time() - _last_line[0] >= every:
        print(line, file=sys.stderr, flush=True)
        _last_line[0] = time.time()


_line_open = [False]      # a progress line waits for its end: an error starts on a line of its own
_last_line = [0.]


def fresh_line():
    """'\n' if a progress line is open on the terminal (what is printed next starts below it)."""
    was_open, _line_open[0] = _line_open[0], False
    return '\n' if was_open else ''


def fail(message):
    """The one-line error our scripts end with: no traceback, exit status 2."""
    sys.stderr.write(f'{fresh_line()}error: {message}\n')     # one write: threads may print too
    sys.stderr.flush()
    sys.exit(2)


def at_least(**lowest):
    """A script's counting flags: one error line for the first below its lowest value."""
    for name, low in lowest.items():
        if flags.FLAGS[name].value < low:
            fail(f'--{name}={flags.FLAGS[name].value} must be at least {low}')
