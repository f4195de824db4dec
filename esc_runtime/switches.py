"""The on/off switches of the environment (``ESC_SR_NATIVE``, ``ESC_SR_ONEDNN``, ``ESC_SR_FFT``), read here and
nowhere else.

Unset or empty: on. Off: ``0``, ``false``, ``no``, ``off``; on: ``1``, ``true``, ``yes``, ``on`` (either case, spaces
around ignored). Anything else is refused with a one-line :class:`SwitchError` naming the variable and its value, so
that a misspelt ``ESC_SR_FFT=flase`` is not silently read as "on" (before: only ``0`` switched anything off).
"""

from __future__ import annotations

import os
from typing import Mapping

from esc_arch.errors import ESCError

__all__ = ["FALSE", "NAMES", "TRUE", "SwitchError", "check", "enabled"]

#: Every switch; :func:`check` reads them all (``prepare`` does), so a misspelt one is refused wherever it is read.
NAMES = ("ESC_SR_NATIVE", "ESC_SR_ONEDNN", "ESC_SR_FFT")
FALSE = ("0", "false", "no", "off")
TRUE = ("1", "true", "yes", "on")


class SwitchError(ESCError, ValueError):
    """An environment switch set to a value that is neither on nor off."""


def enabled(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the switch ``name`` is on (see the module docstring); raises :class:`SwitchError` for another value."""
    raw = (os.environ if environ is None else environ).get(name, "")
    value = raw.strip().lower()
    if value in ("", *TRUE):
        return True
    if value in FALSE:
        return False
    raise SwitchError(f"{name}={raw!r} is not an on/off value: use one of {', '.join(FALSE)} to switch it off, "
                      f"{', '.join(TRUE)} (or leave it unset) for on")


def check(environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`SwitchError` for the first switch set to a value that is neither on nor off (``prepare`` calls
    it: a path passed over for another reason must not hide a misspelt switch)."""
    for name in NAMES:
        enabled(name, environ)
