"""``python -m esc_sr.cli ...`` (and ``torchrun -m esc_sr.cli ...``): the same program as ``esc-sr ...``."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
