"""The ESC inference runtime: fast CPU implementations of ESC's layers and layer-streamed execution, applied to
the plain models of :mod:`esc_arch` (which never imports this package)."""
