"""Train an ESC model with a BasicSR option file: ``python train.py -opt options/ESC_x4.yml``.

Same as the ``esc-train`` command; outputs go under the current directory (``experiments/``, ``tb_logger/``).
"""

from basicsr_plugin.entry import train_main

if __name__ == "__main__":
    train_main()
