"""The errors meant for users: :class:`ESCError`, a problem with the user's input, files or environment, not a bug
(any other exception escaping the library is one). Its message is one line naming the file and the reason, which
front ends show as it is; the rule is enforced here (:func:`printable`), so a newline or a terminal escape in a
file name can neither split the line nor reach the terminal raw. :func:`os_error_reason` words an ``OSError``."""

from __future__ import annotations

import errno
import os

__all__ = ["CheckpointError", "ESCError", "first_line", "os_error_reason", "printable"]


def printable(text: object) -> str:
    """``text`` as one line of plain characters: control characters (newline, tab, ESC, DEL, C1), format
    characters (bidirectional overrides, zero-width ones), line separators and undecodable bytes of a file name
    (lone surrogates) are written as Python escapes (``\\n``, ``\\x1b``, ``\\u202e``, ``\\udcff``); everything
    else is kept as it is."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)


class ESCError(Exception):
    """A problem with the user's input, files or environment; its message is one line that names the
    file and the reason (made so by :func:`printable`)."""

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str):
            args = (printable(args[0]),)
        super().__init__(*args)


class CheckpointError(ESCError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""


_OS_REASONS = {
    errno.ENOENT: "no such file",
    errno.EACCES: "permission denied (the file cannot be read)",
    errno.EPERM: "permission denied (the file cannot be read)",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "no such file (a component of the path is not a folder)",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_reason(error: OSError) -> str:
    """The reason of an ``OSError`` in a few plain words, without the file name (the caller puts it first)."""
    reason = _OS_REASONS.get(error.errno or 0)
    if reason:
        return reason
    return (error.strerror or os.strerror(error.errno) if error.errno else str(error) or type(error).__name__).lower()


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
