"""Running the project's scripts as a user would, for the tests of their command lines."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=300, env=None):
    """`python script args...` from the repository root; TF's own logging silenced; `env`: more
    environment variables."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {})))


def error_line(r):
    """The one `error:` line a refused command ends with: exit status 2, no traceback."""
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, r.stderr
    return lines[0]
