"""The errors a user sees, one home for them: each is one line naming what is wrong (a file,
a flag, a value), which the commands print as `error: ...` without a traceback. No
TensorFlow here, so that any module may import it.

    try:
        images = data.read_images('photos/', hp, 16)
    except errors.DataError as e:
        print(errors.first_line(e))
"""
import re


class HParamsError(ValueError):
    """A preset, field or value that cannot work; the message names it and the valid choices."""


class DataError(ValueError):
    """Missing, unreadable or malformed data; the message is one line naming the path."""


# A ValueError, as official.py's was; checkpoints.verify raises its own outside the `except
# ValueError` that sorts TensorFlow's read errors, so none is taken for a read error.
class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted, read or fitted to the model; the message says which
    and why."""


class FileError(ValueError):
    """A compressed file that is not ours, not whole, or not for this model: one line names it."""


def first_line(e):
    """The first line of what an exception says (its type's name if it says nothing)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def reason(e):
    """What an I/O error says, without TensorFlow's op and function decorations."""
    text = re.sub(r'^\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]$', '', first_line(e))
    return text.rsplit('; ', 1)[-1]
