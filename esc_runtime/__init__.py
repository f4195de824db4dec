"""The ESC inference runtime: a plain :mod:`esc_arch` model prepared once for a device and dtype.

    import esc_arch, esc_runtime
    prepared = esc_runtime.prepare(esc_arch.load_model("default"), "cpu", torch.float32)
    sr = prepared(lr)                                   # each layer on its chosen implementation
    sr = prepared(lr, esc_runtime.TiledMaps(256, window=prepared.window_size))  # layer-streamed, same output
    print("\\n".join(prepared.report()))                  # what runs, and why not the faster ones

:mod:`esc_arch` never imports this package; training, ONNX export and ``torch.compile`` use the plain model.
"""

from .dispatch import Choice, choose
from .layers import KINDS, Target
from .prepare import PreparedModel, plan, prepare
from .report import attention_kernel, sdpa_kernel_name
from .streaming import WHOLE, MapRunner, TiledMaps, count_stages

__all__ = ["Choice", "KINDS", "MapRunner", "PreparedModel", "Target", "TiledMaps", "WHOLE", "attention_kernel",
           "choose", "count_stages", "plan", "prepare", "sdpa_kernel_name"]
