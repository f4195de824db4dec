"""``esc-sr demo``: see ESC work in one command, offline, on a sample image shipped with the package.

What it does:

1. takes a high-resolution (HR) image — by default ``assets/chelsea_256x320.png``, a CC0 crop of
   scikit-image's "chelsea" photo — and crops it to a multiple of the model's scale;
2. makes two low-resolution (LR) inputs: a clean one by bicubic downscaling (see :func:`bicubic_resize`), and
   that one saved as a JPEG at quality :data:`JPEG_QUALITY` (a photo downscaled and re-saved for the web);
3. upscales each LR image with the models through :func:`esc_sr.upscale` — without a model named, every
   embedded model (:data:`esc_arch.EMBEDDED_MODELS`: the classic ``default`` and the real-world ``real``) —
   and with bicubic interpolation and nearest-neighbour replication as baselines;
4. writes a comparison PNG, one row per input (LR nearest | bicubic | each model | HR), with the PSNR of each
   against the HR image in the captions, plus the LR inputs and the first model's output, all atomically;
5. prints where it wrote.

PSNR follows the SR papers' (and BasicSR's) protocol: 8-bit images, Y channel of ITU-R BT.601
YCbCr, ``scale`` pixels cropped from every border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from esc_arch.errors import ESCError

__all__ = [
    "SAMPLE_IMAGE",
    "JPEG_QUALITY",
    "DemoError",
    "DemoResult",
    "bicubic_resize",
    "nearest_upscale",
    "psnr_y",
    "compose_comparison",
    "run_demo",
]

SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "chelsea_256x320.png"
SAMPLE_CREDIT = "chelsea (skimage.data, CC0, photo by Stefan van der Walt)"

# Panels larger than this (HR pixels per side) are shown as a centre crop of this size, so a
# user's 4K photo still gives a comparison image one can look at; PSNR uses the whole image.
_MAX_PANEL_SIDE = 512
_PANEL_GAP = 8
_CAPTION_FONT_SIZE = 15
#: The quality of the demo's JPEG input: low enough that a model trained on clean inputs shows the 8x8 blocks.
JPEG_QUALITY = 40
#: The two inputs, in the order of the comparison's rows.
INPUTS = ("clean", f"jpeg_q{JPEG_QUALITY}")


class DemoError(ESCError, ValueError):
    """A demo input problem (bad image, unusable model); the message is one line for users."""


@dataclass
class DemoResult:
    """Where the demo wrote and what it measured."""

    comparison: Path
    lr_image: Path
    sr_image: Path
    scale: int
    model_label: str
    psnr: dict[str, float] = field(default_factory=dict)  # 'nearest', 'bicubic', 'esc' (the first model) -> dB
    jpeg_image: Path | None = None  # the JPEG LR input
    models: list[str] = field(default_factory=list)  # the models' labels, in the comparison's order
    # input ('clean', 'jpeg_q40') -> 'nearest' / 'bicubic' / each model's label -> dB
    psnr_by_input: dict[str, dict[str, float]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ resampling


def bicubic_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of 8-bit RGB ``pixels`` to ``size = (width, height)``, returned as uint8.

    Uses chainner-ext's ``CubicCatrom`` filter without gamma correction. Catmull-Rom is the Keys
    cubic with a = -0.5, the kernel of MATLAB's ``imresize(..., 'bicubic')``, and chainner-ext
    widens the kernel when downscaling as MATLAB's antialiasing does. Measured against BasicSR's
    port of MATLAB ``imresize`` (``tests/test_demo.py``): identical (to float rounding) except
    within 2 pixels of the image border, where chainner-ext clamps the edge and MATLAB mirrors it,
    and except that chainner-ext clips overshoot to [0, 1] (as MATLAB does for 8-bit images).
    """
    import chainner_ext

    from .images import from_float, to_float

    width, height = size
    values = np.ascontiguousarray(to_float(pixels))
    out = chainner_ext.resize(values, (int(width), int(height)), chainner_ext.ResizeFilter.CubicCatrom, False)
    return from_float(out, np.uint8)


def nearest_upscale(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Pixel replication by an integer ``scale`` (chainner-ext ``Nearest``), uint8 in and out."""
    import chainner_ext

    from .images import from_float, to_float

    height, width = pixels.shape[:2]
    values = np.ascontiguousarray(to_float(pixels))
    out = chainner_ext.resize(values, (width * scale, height * scale), chainner_ext.ResizeFilter.Nearest, False)
    return from_float(out, np.uint8)


# --------------------------------------------------------------------------------------- metrics


def _luma_bt601(rgb: np.ndarray) -> np.ndarray:
    """Y of ITU-R BT.601 YCbCr in [16, 235] (float64) from 8-bit RGB, as MATLAB's rgb2ycbcr."""
    weights = np.array([65.481, 128.553, 24.966]) / 255.0
    return rgb.astype(np.float64) @ weights + 16.0


def psnr_y(image: np.ndarray, reference: np.ndarray, *, crop_border: int) -> float:
    """PSNR in dB between two 8-bit RGB images on the Y channel, ``crop_border`` px cropped.

    Returns ``inf`` for identical images.
    """
    if image.shape != reference.shape:
        raise ValueError(f"PSNR needs images of one shape, got {image.shape} and {reference.shape}")
    y_image, y_reference = _luma_bt601(image), _luma_bt601(reference)
    if crop_border:
        y_image = y_image[crop_border:-crop_border, crop_border:-crop_border]
        y_reference = y_reference[crop_border:-crop_border, crop_border:-crop_border]
    mse = float(np.mean((y_image - y_reference) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------ composition


def _load_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()  # the small bitmap font


def compose_comparison(panels: Sequence[tuple[np.ndarray, Sequence[str]]], *, title: str = "") -> np.ndarray:
    """Lay out equally sized uint8 RGB ``panels`` side by side with caption lines under each.

    Args:
        panels: ``(pixels, caption_lines)`` pairs; every ``pixels`` array has the same shape.
        title: an optional line above the row.

    Returns:
        The composed image as a uint8 ``HxWx3`` array.
    """
    from PIL import Image, ImageDraw

    shapes = {p.shape for p, _ in panels}
    if len(shapes) != 1:
        raise ValueError(f"comparison panels must share one shape, got {sorted(shapes)}")
    panel_h, panel_w = panels[0][0].shape[:2]
    font = _load_font(_CAPTION_FONT_SIZE)
    line_h = _CAPTION_FONT_SIZE + 5
    caption_lines = max(len(lines) for _, lines in panels)
    title_h = line_h + _PANEL_GAP if title else 0

    width = len(panels) * panel_w + (len(panels) + 1) * _PANEL_GAP
    height = title_h + panel_h + caption_lines * line_h + 3 * _PANEL_GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PANEL_GAP, _PANEL_GAP), title, fill=(0, 0, 0), font=font)
    top = _PANEL_GAP + title_h
    for index, (pixels, lines) in enumerate(panels):
        left = _PANEL_GAP + index * (panel_w + _PANEL_GAP)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels[..., :3])), (left, top))
        for line_no, line in enumerate(lines):
            draw.text((left, top + panel_h + _PANEL_GAP // 2 + line_no * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _view_window(height: int, width: int) -> tuple[slice, slice]:
    """The centre region shown in the panels (the whole image when it is small enough)."""
    crop_h, crop_w = min(height, _MAX_PANEL_SIDE), min(width, _MAX_PANEL_SIDE)
    if (crop_h, crop_w) == (height, width):
        return slice(None), slice(None)
    crop_h = crop_w = min(crop_h, crop_w, 384)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return slice(top, top + crop_h), slice(left, left + crop_w)


# ------------------------------------------------------------------------------------- the demo


def _as_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Any layout read by :func:`esc_sr.images.read_image` -> uint8 RGB (alpha dropped)."""
    from .images import from_float, to_float

    if pixels.dtype != np.uint8:
        pixels = from_float(to_float(pixels), np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] in (1, 2):
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def _load_model(spec: str) -> tuple[Any, str]:
    """Load an embedded model's name, a checkpoint path or an official registry name; return (model, label)."""
    from esc_arch import EMBEDDED_MODELS, load_model
    from . import hub

    if spec in EMBEDDED_MODELS:
        return load_model(spec), f"embedded {spec} model"
    path = hub.resolve_model(spec)
    return load_model(path), Path(spec).name if Path(spec).exists() else hub.lookup(spec).name


def _load_models(model: str | Any | None) -> list[tuple[Any, str, str]]:
    """``(model, title label, panel label)`` for each model the demo runs: every embedded model for ``None``."""
    if model is None:
        from esc_arch import EMBEDDED_MODELS

        return [(net, label, f"ESC {name}") for name in EMBEDDED_MODELS for net, label in [_load_model(name)]]
    if isinstance(model, str):
        net, label = _load_model(model)
        return [(net, label, "ESC")]
    return [(model, type(model).__name__, "ESC")]


def jpeg_roundtrip(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> tuple[bytes, np.ndarray]:
    """``pixels`` (uint8 RGB) encoded as a baseline JPEG at ``quality`` (Pillow, 4:2:0 chroma as most web JPEGs),
    and the decoded pixels: the file's bytes and exactly what a reader of that file gets."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        return data, np.asarray(decoded.convert("RGB"))


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Composed rows (uint8 RGB) one above the other on white, left-aligned."""
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return np.concatenate(padded, axis=0)


def _model_scale(model: Any) -> tuple[int, float | None]:
    """(integer scale used for the demo, outscale to pass to the engine or None)."""
    if getattr(model, "arbitrary_scale", False):
        return 4, 4.0  # arbitrary-scale model: demonstrate it at x4
    scale = int(getattr(model, "scale", 0))
    if scale < 2:
        raise DemoError(f"the demo needs a model that upscales (scale >= 2); this one has scale {scale}")
    return scale, None


def run_demo(
    out_dir: str | Path,
    *,
    model: str | Any | None = None,
    image: str | Path | None = None,
    device: str | None = None,
    progress: bool = False,
) -> DemoResult:
    """Run the demo and write its files into ``out_dir`` (created if needed).

    Args:
        out_dir: folder for ``comparison.png``, ``lr.png``, ``lr_jpeg_q40.jpg`` and ``esc_x{scale}.png``.
        model: ``None`` (every embedded model, side by side), an embedded model's name, a checkpoint path, an
            official registry name (downloaded once, see :mod:`esc_sr.hub`), or an already loaded model.
        image: an HR image to use instead of the shipped sample.
        device: torch device for the model (default: CPU, or wherever the model already is).
        progress: show the engine's tile progress bar.

    Returns:
        A :class:`DemoResult` with the written paths and the PSNRs.

    Raises:
        DemoError, esc_arch.CheckpointError, esc_sr.hub.HubError,
        esc_sr.images.ImageReadError / ImageWriteError: one-line messages for users.
    """
    from .engine import upscale
    from .images import ImageWriteError, read_image, write_bytes_atomic, write_image

    nets = _load_models(model)
    scales = {_model_scale(net) for net, _, _ in nets}
    if len(scales) != 1:
        raise DemoError("the demo's models must share one scale")
    scale, outscale = scales.pop()
    model_label = nets[0][1] if len(nets) == 1 else "embedded models: " + ", ".join(p.split()[-1] for *_, p in nets)

    source = Path(image) if image is not None else SAMPLE_IMAGE
    hr = _as_rgb8(read_image(source).pixels)
    height, width = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    if height < scale or width < scale:
        raise DemoError(f"{source}: image is {hr.shape[1]}x{hr.shape[0]}, too small for a x{scale} demo")
    hr = hr[:height, :width]  # "mod crop", as benchmark HR images are cropped

    out = Path(out_dir)
    paths = {"comparison": out / "comparison.png", "lr": out / "lr.png", "sr": out / f"esc_x{scale}.png",
             "jpeg": out / f"lr_jpeg_q{JPEG_QUALITY}.jpg"}
    if any(p.resolve() == source.resolve() for p in paths.values()):
        raise DemoError(f"{source}: the demo would overwrite its own input; choose another --out folder")

    lr = bicubic_resize(hr, (width // scale, height // scale))
    jpeg_bytes, lr_jpeg = jpeg_roundtrip(lr)
    engine_kwargs: dict[str, Any] = {"progress": progress, "precision": "fp32"}
    if device is not None:
        engine_kwargs["device"] = device
    if outscale is not None:
        engine_kwargs["outscale"] = outscale

    rows, cols = _view_window(height, width)
    cropped = (rows, cols) != (slice(None), slice(None))
    lr_h, lr_w = lr.shape[:2]
    label = SAMPLE_CREDIT if image is None else source.name
    psnr_by_input: dict[str, dict[str, float]] = {}
    boards, first_sr = [], None
    for kind, lr_in in zip(INPUTS, (lr, lr_jpeg)):
        results = {"nearest": nearest_upscale(lr_in, scale), "bicubic": bicubic_resize(lr_in, (width, height))}
        for net, _, panel in nets:
            results[panel] = upscale(net, lr_in, **engine_kwargs)
        first_sr = results[nets[0][2]] if first_sr is None else first_sr
        psnr_by_input[kind] = {name: psnr_y(result, hr, crop_border=scale) for name, result in results.items()}
        db = psnr_by_input[kind]
        what = "bicubic /" + str(scale) if kind == "clean" else f"bicubic /{scale} + JPEG q{JPEG_QUALITY}"
        panels = [(results["nearest"][rows, cols], [f"LR {lr_w}x{lr_h} ({what}),", f"nearest x{scale}: {_db(db['nearest'])}"]),
                  (results["bicubic"][rows, cols], [f"Bicubic x{scale}", f"PSNR {_db(db['bicubic'])}"])]
        panels += [(results[panel][rows, cols], [f"{panel} x{scale}", f"PSNR {_db(db[panel])}"]) for *_, panel in nets]
        panels.append((hr[rows, cols], [f"HR {width}x{height} (ground truth)", "PSNR: Y channel, crop " + str(scale)]))
        input_label = "clean input" if kind == "clean" else f"JPEG q{JPEG_QUALITY} input"
        title = f"{input_label} | {label} | model: {model_label}" + (" | centre crop shown" if cropped else "")
        boards.append(compose_comparison(panels, title=title))
    comparison = stack_rows(boards)

    first = nets[0][2]
    psnr = {"nearest": psnr_by_input["clean"]["nearest"], "bicubic": psnr_by_input["clean"]["bicubic"],
            "esc": psnr_by_input["clean"][first]}
    out.mkdir(parents=True, exist_ok=True)
    write_image(paths["lr"], lr)
    try:
        write_bytes_atomic(paths["jpeg"], jpeg_bytes)  # the JPEG input itself, to try with esc-sr upscale
    except OSError as exc:
        raise ImageWriteError(paths["jpeg"], f"cannot write file ({exc.strerror or exc})") from None
    write_image(paths["sr"], first_sr)
    write_image(paths["comparison"], comparison)  # last: its presence means the demo finished
    return DemoResult(paths["comparison"], paths["lr"], paths["sr"], scale, model_label, psnr,
                      jpeg_image=paths["jpeg"], models=[panel for *_, panel in nets], psnr_by_input=psnr_by_input)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f} dB"

