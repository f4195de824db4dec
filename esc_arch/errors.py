"""The one base class of the errors meant for users, shared by :mod:`esc_arch` and :mod:`esc_sr`.

An :class:`ESCError` is a problem with the user's input, files or environment (a checkpoint that cannot be
read, a truncated image, a failed download), not a bug: its message is one line that names the file and the
reason, and front ends (the ``esc-sr`` command line, the ComfyUI nodes) show it as it is. Any other exception
escaping the library is a bug.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ESCError"]


class ESCError(Exception):
    """A problem with the user's input, files or environment; its message is one line that names the
    file and the reason."""


class CheckpointError(ESCError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""
