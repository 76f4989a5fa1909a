"""What identifies a file's content on disk without reading it, for the pollers that reload
files when they change (the limits config, the TLS certificates)."""

from __future__ import annotations

import os

FileMark = tuple[str, str, int, int, int]  # (path as given, real path, inode, size, mtime ns)


def file_mark(path: str) -> FileMark:
    """The file's mark; raises OSError when it cannot be stat'ed. The real path and inode catch
    a swapped symlink (Kubernetes ConfigMaps and Secrets) even when size and mtime match."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return (path, real, stat.st_ino, stat.st_size, stat.st_mtime_ns)
