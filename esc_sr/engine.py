"""The one inference engine: :func:`upscale` runs any ESC model on any image, of any size.

Used by the ``esc-sr`` command line, the ComfyUI nodes, the Spandrel call path and the benchmarks.

How an image goes through it
----------------------------
1. **Kinds.** A torch tensor (``NCHW`` or ``CHW`` float in [0, 1], RGB), a numpy array (``HxW``,
   ``HxWx1..4``; uint8, uint16 or float in [0, 1]) or a PIL image. The result has the same kind,
   layout and dtype as the input.
2. **Channels.** The models are RGB. Gray is replicated to RGB and the output averaged back to one
   channel (gray in, gray out). Alpha is upscaled separately: by default it goes through the same
   model as a gray image (sharp, model-quality edges; ``alpha='model'``), or with chainner-ext's
   Lanczos resize (``alpha='resize'``, faster). A fully opaque alpha is not run at all.
3. **Padding, the official way.** The LR image is reflect-padded on the right and bottom to a
   multiple of ``model.window_size`` and the output cropped back to ``h*scale x w*scale``: the
   evaluation protocol of the ESC paper, so benchmark PSNR matches it.
4. **Tiling.** Only when the image does not fit (or a ``tile`` is asked for). The tiles are cut on the window
   grid, and by default the model is **layer-streamed** (:mod:`esc_runtime.streaming`): each stage of the network
   runs over every tile before the next stage starts, from whole LR feature maps kept in memory, so a tile needs
   only its stage's own radius of context, window attention none, and the dynamic kernels' global averages are
   taken over the whole map. The result is the untiled one up to float rounding, at a few percent more compute
   (``benchmarks/streamed_tiling.py``). When even the whole feature maps (a few ``dim``-channel LR maps) do not
   fit, the fallback is **crop-overlap** tiles: each core is run with ``overlap`` pixels of real image context on
   every side (rounded up to the window) and only its core is kept; a first pass over the tiles gathers the
   whole-image averages of the global pools and the output pass gives them to every tile
   (:class:`esc_sr.tiling.GlobalPooling`). With the default overlap that output matches the untiled one within 1/255 on 8-bit
   output.
5. **Memory.** ``tile='auto'`` runs the image untiled whenever its estimated working set fits half the
   device's free memory (:func:`fits_untiled`): untiled is the fastest run. Otherwise it streams with the
   largest tile that fits beside the feature maps (fewest tiles), or, when the maps do not fit, picks the largest
   crop-overlap tile whose working memory fits (capped on CPU, where the OOM killer, not an error, answers an
   over-allocation). On out-of-memory (CUDA OOM, or a CPU allocation failure) an untiled run is retried with
   half-size tiles, streaming falls back to crop-overlap tiles, and a crop-overlap tile is halved and the remaining
   tiles redone (finished tiles are kept).
6. **Precision.** ``'auto'`` is fp16 on CUDA/MPS and fp32 on CPU; ``'fp16'``/``'bf16'`` are
   honoured where the device runs them. A half-precision tile that overflows to inf/NaN is
   recomputed in fp32.
7. **Scale.** ``outscale`` other than the model's scale: fixed-scale models run at their scale and
   the result is resized with chainner-ext (Lanczos); the arbitrary-scale ``ESCLTE`` model gets
   the factor itself.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import nn

import esc_arch
from esc_arch import pad_to_multiple
import esc_runtime
from esc_runtime import PreparedModel, TiledMaps

from .errors import EngineError, OutOfMemory
from . import scopes
from .memory import (
    MemorySpec, available_memory, check_memory, estimate_memory, fits_untiled, format_bytes, is_out_of_memory,
    window_of,
)
from .planes import from_numpy, from_pil, from_tensor, geometry, is_pil
from . import ladder
from .runner import MAX_QUERIES, Runner
from .tiling import DEFAULT_OVERLAP, ProgressSpec, TileProgress, TileSpec, auto_tile_size, context_pixels

__all__ = [
    "DEFAULT_OVERLAP",
    "EngineError",
    "OutOfMemory",
    "upscale",
    "prepare_model",
    "resolve_device",
    "resolve_precision",
    "auto_tile_size",
    "fits_untiled",
    "is_out_of_memory",
    "available_memory",
    "estimate_memory",
    "check_memory",
    "format_bytes",
]

Precision = Literal["auto", "fp32", "fp16", "bf16"]



# ------------------------------------------------------------------------------------------ devices


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None``: the model's device (CPU for a model without parameters); ``'auto'``: CUDA, else MPS,
    else CPU; anything else is passed to ``torch.device``."""
    if device is None:
        if model is not None:
            for tensor in model.parameters():
                return tensor.device
        return torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but this torch build has no usable CUDA")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Map ``'auto' | 'fp32' | 'fp16' | 'bf16'`` to a dtype this device can run (:mod:`esc_sr.precision`)."""
    from .precision import resolve_precision as resolve  # the policy lives in esc_sr/precision.py

    return resolve(precision, device)


def prepare_model(
    model: nn.Module, device: str | torch.device | None = None, precision: str = "auto"
) -> tuple[nn.Module, torch.device, torch.dtype]:
    """Return ``(model, device, dtype)``: the model prepared for inference on ``device`` in the precision's dtype
    (:func:`esc_runtime.prepare`: each layer's implementation chosen once).

    A model already on the device, in the dtype and in eval mode is used as it is (nothing is copied or baked: the
    caller's model is left as it was); otherwise a fused copy is prepared. Call this once and pass the result to
    :func:`upscale` for many images (then :func:`upscale` has nothing to prepare).
    """
    device = resolve_device(device, model)
    dtype = resolve_precision(precision, device)
    if isinstance(model, (esc_arch.ESCModelBase, PreparedModel)):
        if isinstance(model, PreparedModel) and (model.target.device, model.target.dtype) != (device, dtype):
            model = model.model
        return esc_runtime.prepare(model, device, dtype), device, dtype
    params = list(model.parameters())
    usable = getattr(model, "is_fused", True) or not model.training
    if params and all(p.device == device and p.dtype == dtype for p in params) and usable:
        return model, device, dtype
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval(), device, dtype


# ------------------------------------------------------------------------------------------ running


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _run_fixed_scale(
    runner: Runner, lr: torch.Tensor, *, scale: int, window: int, tile: TileSpec, overlap: int,
    progress: TileProgress,
) -> torch.Tensor:
    """Upscale one ``(1, 3, h, w)`` float32 CPU image with a fixed-scale model; returns ``(1, 3, h*s, w*s)``.

    Untiled when it fits (or ``tile`` is None); else layer-streamed over tiles when the whole feature maps fit
    (exact, no context recomputed); else crop-overlap tiles with a statistics pass."""
    h, w = lr.shape[-2:]
    padded = pad_to_multiple(lr.to(runner.device), window)  # on the device once (float32: the fp32 fallback's input)
    ph, pw = padded.shape[-2:]
    context = context_pixels(overlap, window)
    out = torch.empty((1, 3, h * scale, w * scale), dtype=torch.float32)

    def process(box: tuple[int, int, int, int]) -> None:
        y0, y1, x0, x1 = box
        iy0, iy1 = max(0, y0 - context), min(ph, y1 + context)
        ix0, ix1 = max(0, x0 - context), min(pw, x1 + context)
        result = runner(padded[..., iy0:iy1, ix0:ix1], (y0 - iy0, y1 - iy0, x0 - ix0, x1 - ix0))
        if result is None:  # statistics pass
            return
        expected = ((iy1 - iy0) * scale, (ix1 - ix0) * scale)
        if tuple(result.shape[-2:]) != expected:
            raise EngineError(
                f"the model returned {tuple(result.shape[-2:])} for a {(iy1 - iy0, ix1 - ix0)} input, "
                f"not x{scale} as its .scale says"
            )
        # Keep the core, cropped to the real (unpadded) image.
        oy1, ox1 = min(y1, h), min(x1, w)
        if oy1 > y0 and ox1 > x0:
            out[..., y0 * scale : oy1 * scale, x0 * scale : ox1 * scale] = result[
                ..., (y0 - iy0) * scale : (oy1 - iy0) * scale, (x0 - ix0) * scale : (ox1 - ix0) * scale
            ]

    def stream(maps: TiledMaps) -> None:
        out.copy_(runner.stream(padded, maps)[..., : h * scale, : w * scale])

    ladder.run(runner, tile, height=ph, width=pw, window=window, overlap=overlap, progress=progress, process=process,
               stream=stream if _streams(runner.model) else None)
    return out


def _streams(model: nn.Module) -> bool:
    """Models whose forward pass can be layer-streamed (:mod:`esc_runtime.streaming`): every prepared ESC model."""
    return isinstance(model, PreparedModel)


# ------------------------------------------------------------------------------------ arbitrary scale


def is_arbitrary_scale(model: nn.Module) -> bool:
    return getattr(model, "arbitrary_scale", False)


def _output_centres(out_size: int, in_size: int) -> np.ndarray:
    """LR-pixel positions (0 = top/left edge) of the centres of ``out_size`` output pixels."""
    return (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)


def _run_arbitrary_scale(
    runner: Runner, lr: torch.Tensor, *, factor: float, window: int, tile: TileSpec, overlap: int,
    progress: TileProgress, max_queries: int = MAX_QUERIES,
) -> torch.Tensor:
    """ESCLTE: the factor goes to the model.

    Tiles cut the LR encoder input (no model-level padding: the upstream LTE protocol feeds the
    image as is). Each tile decodes exactly the output pixels whose centres fall in its core,
    with query coordinates and cells re-expressed in the tile's own [-1, 1] frame; every term of
    the LTE decoder (half-pixel shifts, relative coordinates, cells, the bilinear skip) is
    measured in LR pixels, so this equals the whole-image decode up to encoder context, which
    ``overlap`` supplies.
    """
    model = runner.model
    lr = lr.to(runner.device)  # once, not per tile
    h, w = lr.shape[-2:]
    out_h, out_w = max(1, round(h * factor)), max(1, round(w * factor))
    cell = np.array(model.query_cell((h, w), (out_h, out_w)))
    centre_y, centre_x = _output_centres(out_h, h), _output_centres(out_w, w)
    context = context_pixels(overlap, window)
    out = torch.empty((1, 3, out_h, out_w), dtype=torch.float32)

    def process(box: tuple[int, int, int, int]) -> None:
        y0, y1, x0, x1 = box
        ry = np.searchsorted(centre_y, [y0, y1], side="left")
        rx = np.searchsorted(centre_x, [x0, x1], side="left")
        empty = ry[1] <= ry[0] or rx[1] <= rx[0]  # possible when factor < 1
        if empty and runner.pooling.mode != "collect":
            return
        iy0, iy1 = max(0, y0 - context), min(h, y1 + context)
        ix0, ix1 = max(0, x0 - context), min(w, x1 + context)
        th, tw = iy1 - iy0, ix1 - ix0
        ys = -1 + 2 * (centre_y[ry[0] : ry[1]] - iy0) / th
        xs = -1 + 2 * (centre_x[rx[0] : rx[1]] - ix0) / tw
        grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
        coord = torch.from_numpy(grid).to(runner.device, runner.dtype)[None]
        tile_cell = torch.tensor([cell[0] * h / th, cell[1] * w / tw], device=runner.device, dtype=runner.dtype)
        tile_lr = lr[..., iy0:iy1, ix0:ix1].to(runner.device, runner.dtype)
        core_in_tile = (y0 - iy0, y1 - iy0, x0 - ix0, x1 - ix0)
        encoded = runner.call(model, lambda view: view.encode(tile_lr), core_in_tile, (th, tw))
        if encoded is None or empty:  # statistics pass, or nothing to decode here
            return
        rgb = torch.cat(
            [
                model.query(encoded, coord[:, s : s + max_queries], tile_cell.expand(1, min(max_queries, coord.shape[1] - s), 2))
                for s in range(0, coord.shape[1], max_queries)
            ],
            dim=1,
        )
        rows, cols = ry[1] - ry[0], rx[1] - rx[0]
        out[..., ry[0] : ry[1], rx[0] : rx[1]] = rgb.transpose(1, 2).reshape(1, 3, rows, cols)  # one host copy

    def stream(maps: TiledMaps) -> None:
        out.copy_(runner.stream(lr, maps, size=(out_h, out_w)))

    ladder.run(runner, tile, height=h, width=w, window=window, overlap=overlap, progress=progress, process=process,
               stream=stream if _streams(model) else None, outscale=factor)
    return out


# ------------------------------------------------------------------------------------------ upscale


def upscale(
    model: nn.Module,
    image: Any,
    *,
    outscale: float | None = None,
    tile: TileSpec = "auto",
    overlap: int = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    precision: str = "auto",
    alpha: Literal["model", "resize"] = "model",
    progress: ProgressSpec = False,
    max_memory: MemorySpec = "auto",
    make_room: Callable[[], None] | None = None,
) -> Any:
    """Upscale ``image`` with ``model``; see the module docstring for the full behaviour.

    Args:
        model: an esc_arch image model (``.scale``, ``.window_size``), or an ``ESCLTE``.
        image: ``NCHW``/``CHW`` float tensor in [0, 1] (RGB), numpy ``HxW``/``HxWxC`` (uint8,
            uint16 or float), or a PIL image. Gray, gray+alpha, RGB and RGBA are accepted.
        outscale: output/input size ratio; default: the model's scale (``ESCLTE``: required).
        tile: LR tile side in pixels (rounded down to a multiple of the window), ``'auto'``
            (untiled when the image fits in free memory, else tiles sized from it), or ``None`` to run the
            whole image at once.
        overlap: LR pixels of context around each crop-overlap tile (rounded up to the window); layer-streamed
            tiles need none.
        device: ``None`` (the model's device), ``'auto'``, or a torch device string.
        precision: ``'auto'`` (fp16 on CUDA/MPS, fp32 on CPU), ``'fp32'``, ``'fp16'`` or ``'bf16'``.
        alpha: how alpha is upscaled: ``'model'`` (as a gray image through the model) or
            ``'resize'`` (chainner-ext Lanczos).
        progress: ``True`` for a tqdm bar over tiles, or a callback ``(done, total)``.
        max_memory: the memory the image's copies and output may take (:func:`estimate_memory`): ``'auto'`` (the
            RAM available now), a number of bytes, or None (no check). A larger job is refused before the model
            runs, instead of failing (or being killed) when its output is allocated.
        make_room: a host's way to free device memory it holds (ComfyUI: unload its other models), tried once when
            even the smallest tile runs out of memory, before the image fails.

    Non-finite input values (NaN, Inf: possible in float images) are replaced, NaN and -Inf by 0 and +Inf by 1,
    with a ``RuntimeWarning``. A non-finite output is never returned: it raises :class:`EngineError`.

    Returns:
        The upscaled image, of the same kind, channel layout and dtype as ``image``.

    Raises:
        EngineError: a bad argument, an empty image, an unsupported precision on this device, or a non-finite
            output.
        OutOfMemory: the job needs more than ``max_memory``; out of memory with tiling disabled, or even at the
            smallest tile.
    """
    if alpha not in ("model", "resize"):
        raise EngineError(f"alpha must be 'model' or 'resize', not {alpha!r}")
    if overlap < 0:
        raise EngineError("overlap must be >= 0")
    if isinstance(tile, bool) or (tile is not None and tile != "auto" and not isinstance(tile, int)):
        raise EngineError(f"tile must be 'auto', a positive int or None, not {tile!r}")

    arbitrary = is_arbitrary_scale(model)
    native = None if arbitrary else int(model.scale)
    if outscale is None:
        if arbitrary:
            raise EngineError("an arbitrary-scale model needs outscale (the upscaling factor)")
        outscale = float(native)
    if isinstance(outscale, bool) or not isinstance(outscale, (int, float)) or not (outscale > 0 and math.isfinite(outscale)):
        raise EngineError(f"outscale must be a positive number, not {outscale!r}")

    height, width, channels, batch, sample_bytes = geometry(image)
    if batch == 0:
        raise EngineError("the batch is empty (0 images): nothing to upscale")
    if height == 0 or width == 0:
        raise EngineError(f"the image has no pixels ({width}x{height}): nothing to upscale")
    check_memory(height, width, channels, model, outscale=outscale, bytes_per_sample=sample_bytes, alpha=alpha,
                 max_memory=max_memory, batch=batch)

    if isinstance(image, torch.Tensor):
        kind = from_tensor(image)
    elif isinstance(image, np.ndarray):
        kind = from_numpy(image)
    elif is_pil(image):
        kind = from_pil(image)
    else:
        raise EngineError(f"unsupported image type {type(image).__name__}: use a torch tensor, numpy array or PIL image")

    from .precision import for_model

    precision = for_model(precision, model)  # 'auto' is fp32 for a model without half precision (e.g. LTE)
    prepared, run_device, dtype = prepare_model(model, device, precision)
    runner = Runner(prepared, run_device, dtype, fp32=lambda: prepare_model(model, run_device, "fp32")[0],
                    make_room=make_room)
    window = window_of(prepared)
    bar = TileProgress(progress)

    def run_rgb(rgb: torch.Tensor) -> torch.Tensor:
        if arbitrary:
            return _run_arbitrary_scale(runner, rgb, factor=outscale, window=window, tile=tile, overlap=overlap, progress=bar)
        out = _run_fixed_scale(runner, rgb, scale=native, window=window, tile=tile, overlap=overlap, progress=bar)
        if outscale == native:
            return out
        return _resize_planes(out.clamp_(0.0, 1.0), _target_size(rgb, outscale))  # resize the image, not overshoot

    def run_gray(gray: torch.Tensor) -> torch.Tensor:
        return run_rgb(gray.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)

    def run_alpha(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if bool((a >= 1.0).all()):
            return torch.ones((1, 1, size[0], size[1]), dtype=torch.float32)
        if alpha == "resize":
            return _resize_planes(a, size)
        out = run_gray(a)
        return out if tuple(out.shape[-2:]) == size else _resize_planes(out, size)

    outs = []
    with _eval_mode(prepared), torch.inference_mode(), scopes.call(prepared, run_device, dtype, height, width):
        try:
            for x in kind.planes:
                channels = x.shape[1]
                if channels == 3:
                    y = run_rgb(x)
                elif channels == 1:
                    y = run_gray(x)
                else:
                    color = run_rgb(x[:, :3]) if channels == 4 else run_gray(x[:, :1])
                    a = run_alpha(x[:, channels - 1 :], tuple(color.shape[-2:]))
                    y = torch.cat([color, a], 1)
                if not bool(torch.isfinite(y).all()):
                    bad = int((~torch.isfinite(y)).sum())
                    raise EngineError(
                        f"the model's output has {bad:,} non-finite values (NaN or Inf) of {y.numel():,}: the weights "
                        "or this image's values overflow; no output is returned"
                    )
                outs.append(y.clamp_(0.0, 1.0))
        finally:
            bar.close()
    return kind.restore(outs)


def _target_size(lr: torch.Tensor, outscale: float) -> tuple[int, int]:
    h, w = lr.shape[-2:]
    return max(1, round(h * outscale)), max(1, round(w * outscale))


def _resize_planes(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(1, C, H, W)`` float32 CPU planes to ``size = (H', W')`` with chainner-ext Lanczos."""
    from . import images

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    hwc = x[0].permute(1, 2, 0).contiguous().numpy()
    out = images.resize(hwc, (size[1], size[0]))
    if out.ndim == 2:
        out = out[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))[None]
