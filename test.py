"""Test an ESC model with a BasicSR option file: ``python test.py -opt options/test/ESC_x4.yml``.

Same as the ``esc-test`` command; results go under the current directory (``results/<name>/``).
"""

from basicsr_plugin.entry import test_main

if __name__ == "__main__":
    test_main()
