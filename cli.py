"""
What every script shares on the command line: a bad argument or input ends the script with one line
on stderr, `SCRIPT: error: WHAT (HOW TO FIX)`, and a non-zero exit, never a traceback (SNOOPI_DEBUG=1
shows it), and the checks that run before any expensive work: numbers, devices, paths to write.
"""
import argparse
import functools
import math
import os
import sys
from pathlib import Path


class UserError(ValueError):
    """Bad input. The message is the one line the user sees."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose own errors (an unknown flag, a word where a number goes) are one line
    too, without the usage block: `SCRIPT: error: WHAT (see SCRIPT --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def script(name):
    """Wraps a script's main(argv): its failures end in one line on stderr. A UserError is the
    user's to fix (exit 2); an OSError names the file and the system's reason (exit 1); anything else
    is a fault of ours, reported with a pointer to the traceback (exit 1)."""
    def wrap(main):
        @functools.wraps(main)
        def guarded(argv=None):
            try:
                return main(argv)
            except Exception as e:
                if os.environ.get('SNOOPI_DEBUG'):
                    raise
                sys.stderr.write(f"{name}: error: {message(e)}\n")
                sys.exit(2 if isinstance(e, UserError) else 1)
            except KeyboardInterrupt:
                if os.environ.get('SNOOPI_DEBUG'):
                    raise
                sys.stderr.write(f"{name}: interrupted (what was saved before stays whole)\n")
                sys.exit(130)
        return guarded
    return wrap


def message(e):
    if isinstance(e, UserError):
        return one_line(e)
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ''
        return f"{where}{e.strerror} (check the path, its permissions and the free space)"
    return (f"unexpected {type(e).__name__}: {one_line(e)} (a fault of ours, not of the input: "
            f"rerun with SNOOPI_DEBUG=1 for the traceback and report it)")


def warn(name, text):
    sys.stderr.write(f"{name}: warning: {text}\n")


# -----------------------------------------------------------------------------
# Checks of arguments


def number(flag, value, low=None, high=None, low_open=False, high_open=False, fix=''):
    """A finite number within [low, high] (open ends where asked); None passes (an unset option)."""
    if value is None:
        return value
    rules = []
    if low is not None:
        rules.append(f"{'above' if low_open else 'at least'} {low}")
    if high is not None:
        rules.append(f"{'below' if high_open else 'at most'} {high}")
    ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    if not ok:
        rule = ' and '.join(rules) if rules else 'finite'
        raise UserError(f"{flag} must be {rule}, got {value}" + (f" ({fix})" if fix else ''))
    return value


def device(flag, name):
    """A torch.device this machine has."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {name!r} is not a device (pass cpu, cuda or cuda:N)") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: torch sees no CUDA device on this machine (pass --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA devices "
                            f"(pass cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {name}: torch sees no MPS device on this machine (pass --device cpu)")
    elif dev.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"{flag} {name}: only cpu, cuda and mps are supported (pass --device cpu)")
    return dev


# -----------------------------------------------------------------------------
# Checks of paths: what is read is never written


def overlaps(a, b):
    """True when one path is the other or lies inside it (writing one would touch the other)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def not_an_input(flag, out, inputs):
    """Refuse to write where a file or folder given to read lies."""
    for what, path in inputs:
        if path and overlaps(out, path):
            raise UserError(f"{flag} {out} would write over {what} {path}, which this command reads "
                            f"(pass another {flag})")


def writable_folder(flag, folder):
    """Make `folder` (and its parents) now, before the expensive work, or say why it cannot be."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag}: {folder} is a file, not a folder (pass another path)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create the folder {folder}: {e.strerror} (pass a path under a "
                        f"folder you can write)") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag}: the folder {folder} is not writable (pass a path under a folder you can write)")
    return folder


def writable_file(flag, path):
    """A file about to be written: not a folder, its folder made now."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder (pass a file name, or end the path with / where a folder is meant)")
    writable_folder(flag, path.parent)
    return path


def ours(folder):
    """A folder this project writes: a checkpoint folder or a diffusers export; or an empty one."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / 'denoiser.safetensors').is_file() or (folder / 'model_index.json').is_file()
                                or not any(folder.iterdir()))


def replaceable_folder(flag, folder):
    """A folder about to be replaced whole: only when it is ours (see ours()) or absent."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is an existing file; it would be replaced by a folder (pass another path, "
                        "or remove the file yourself)")
    if folder.exists() and not ours(folder):
        raise UserError(f"{flag} {folder} is a folder this project did not write (no denoiser.safetensors or "
                        "model_index.json in it), so it is not replaced (pass a new path, or empty it yourself)")
    writable_folder(flag, folder.parent)
    return folder
