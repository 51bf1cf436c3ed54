"""Running the project's scripts as a user would, for the tests of their command lines."""
import atexit
import os
import subprocess
import sys

import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts run as forks of one process that imported them (tests/forked.py): the same main, argv,
# working folder, streams, environment and exit status as `python script`, without TensorFlow's
# import per run. bench.py starts afresh: it reports its process's memory, and a fork's resident
# set leaves out the parent's library pages until it touches them.
FORKED = ('train.py', 'sample.py', 'convert.py', 'compress.py', 'tests/storm.py')
# Environment variables the scripts read after start-up (a fork sets them before `main`);
# PYTHONUNBUFFERED the fork makes true itself. Any other (PYTHONPATH, TF_CPP_*: read by the
# interpreter or TensorFlow's import) needs a fresh interpreter.
READ_AFTER_START = {'TF_CONFIG', 'TPU_NAME', 'PYTHONUNBUFFERED', 'PATH'}     # PATH: train.py's nvidia-smi
_servers = {}


def _forks(script, env):
    return script in FORKED and set(env or ()) <= READ_AFTER_START


def run(script, *args, timeout=300, env=None, cwd=ROOT, offline=False):
    """`python script args...` in `cwd` (the repository root); TF's own logging silenced; `env`:
    more environment variables; `offline`: with the network cut off as tests/offline.py does."""
    argv = [sys.executable, os.path.join(ROOT, script), *args]
    if _forks(script, env):
        code, out, err = server(script, offline).run(args, str(cwd), timeout=timeout, env=env)
        if code == 'timeout':
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        return subprocess.CompletedProcess(argv, code, out, err)
    if offline:
        argv[1:1] = [os.path.join(ROOT, 'tests', 'offline.py')]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {})))


def start(script, *args, env=None, output=None):
    """`python script args...` started as a fork in the repository root and left running: a
    forked.Child, with subprocess.Popen's poll, wait, send_signal, kill and communicate.
    `output`: a file both streams go to (else communicate returns them)."""
    if not _forks(script, env):     # no test needs it: a fresh interpreter is subprocess.Popen's
        raise ValueError(f'{script} with {sorted(env or ())} cannot run as a fork')
    return server(script).start(args, ROOT, env=env, output=output)


def server(script, offline=False):
    """This test process's fork server of `script` (tests/forked.py), started on first use."""
    if (script, offline) not in _servers:
        started = _servers[script, offline] = forked.Script(script, offline=offline)
        atexit.register(started.close)
    return _servers[script, offline]


def error_line(r):
    """The one `error:` line a refused command ends with: exit status 2, no traceback."""
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, r.stderr
    return lines[0]
