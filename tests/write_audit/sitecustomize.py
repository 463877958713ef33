"""Imported by every Python process started with this folder on PYTHONPATH (tests/test_cluster.py):
each file a process completes (os.replace / os.rename, the end of every C.atomic write, which is
how the scripts write files, or an append) is recorded as "RANK<TAB>path" in $D2G_WRITE_AUDIT,
RANK being torchrun's global rank ("-" outside a worker). The two-node test then checks which
rank wrote each shared file."""
import builtins
import os

_log, _replace, _rename, _open = os.environ.get("D2G_WRITE_AUDIT"), os.replace, os.rename, builtins.open


def _record(path):
    if _log:
        fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{os.environ.get('RANK', '-')}\t{os.path.abspath(os.fspath(path))}\n".encode())
        os.close(fd)


def replace(src, dst, *a, **kw):
    _replace(src, dst, *a, **kw)
    _record(dst)


def rename(src, dst, *a, **kw):
    _rename(src, dst, *a, **kw)
    _record(dst)


def audited_open(file, mode="r", *a, **kw):
    if isinstance(file, (str, bytes, os.PathLike)) and "a" in mode:
        _record(file)
    return _open(file, mode, *a, **kw)


os.replace, os.rename, builtins.open = replace, rename, audited_open
