"""Running the project's scripts as a user would, for the tests of their command lines."""
import atexit
import os
import subprocess
import sys

import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts run as forks of one process that imported them (tests/forked.py): the same main, argv,
# working folder, streams and exit status as `python script`, without TensorFlow's import
# (~4 s) per run. bench.py measures its own process (peak memory), so it starts afresh.
FORKED = ('train.py', 'sample.py', 'convert.py', 'compress.py', 'tests/storm.py')
_servers = {}


def run(script, *args, timeout=300, env=None, cwd=ROOT, offline=False):
    """`python script args...` in `cwd` (the repository root); TF's own logging silenced; `env`:
    more environment variables (a fresh interpreter then); `offline`: with the network cut off
    as tests/offline.py does."""
    argv = [sys.executable, os.path.join(ROOT, script), *args]
    if script in FORKED and env is None:
        code, out, err = server(script, offline).run(args, str(cwd), timeout=timeout)
        if code == 'timeout':
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        return subprocess.CompletedProcess(argv, code, out, err)
    if offline:
        argv[1:1] = [os.path.join(ROOT, 'tests', 'offline.py')]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {})))


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
