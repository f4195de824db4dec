"""ESC's layers as small native kernels for CPU inference: window attention, the ConvFFN, the partial convolution
with its projection, and the attention's input projection with its LayerNorm.

Why. On CPU, half of an ESC forward pass was window attention inside torch's CPU flash kernel, whose q·kᵀ and p·v
GEMMs (head dimension 16, 1,024 keys) run far below the core's peak and which reads the bias as a
(heads, ws², ws²) matrix. ESC's shapes allow a much simpler kernel (``kernels/window_attention.cpp``): a head is
one 16-float vector register, a query's bias over one key row is ws consecutive floats of the (2ws-1)² table, and
the window's tokens are read straight from the raster-order ``to_qkv`` output. The ConvFFN (``kernels/conv_ffn.cpp``)
runs row by row so its hidden maps stay in the core's cache; the partial convolution (``kernels/symmetric_conv.cpp``)
uses the symmetry of ESC's geometric-ensembled 13x13 kernel (28 orbits instead of 169 taps) and projects each row in
cache; ``kernels/linear_rows.cpp`` runs ``to_qkv`` with its LayerNorm in one pass. Measurements:
``benchmarks/README.md``, "Native CPU kernels".

Build. The kernels are compiled when the package is built (``setup.py``: ``pip install``, ``pip install -e``, a
wheel), never at run time: each source once per instruction-set variant (AVX-512, and AVX2 + FMA; ``kernels/target.h``)
into one library, ``_esc_kernels.so`` beside this file, plain C ABI, no torch headers. The build also writes
``_esc_kernels.json``: the library's SHA-256 and the digest of the sources it was built from, or why nothing was
built (another platform, no compiler, a failed compile: the package then runs torch's operators).

Load. Once per process, and only from this package's folder: the file and its folder must belong to this user or
root and be writable by no one else, the file's SHA-256 must be the one the build wrote (a truncated, replaced or
planted file is refused before it is loaded; the bytes hashed are the bytes loaded), the sources must be the ones
it was built from, and after loading every function of the variant must be there. A refusal falls back to torch's
operators with one RuntimeWarning naming the file and the reason. The threads are OpenMP's: loaded after torch, the
library shares torch's ``libgomp.so.1`` and so its thread pool (threads of their own competed with torch's spinning
ones); each call uses torch's thread count. ctypes releases the GIL during a call.

Variant. :func:`variant` is the one in use: by default the best the CPU runs (``/proc/cpuinfo``), AVX-512 or AVX2,
each with its own register blocking (``kernels/vector.h``); which kernels run by default on each is decided by
measurement, kernel by kernel, in :data:`esc_runtime.layers.NATIVE_BY_DEFAULT` (the report says why).
``ESC_RUNTIME_NATIVE`` (read once: ``0``, ``avx2``, ``avx512``, default ``auto``; ``ESC_SR_NATIVE=0`` is the older
switch) or :func:`select` choose otherwise; a variant asked for runs every kernel (:func:`forced`).

When. :func:`applies` (attention), :func:`takes_ffn` and :func:`prepare_symmetric`: a float32 CPU tensor without
autograd and outside tracing or export, and the library loaded; for attention head dimension 16 and a window that is
a multiple of 16, for the FFN a multiple of 16 channels and a 3x3 depthwise kernel, for the partial convolution a
square kernel symmetric under the square's flips and rotations (the caller's guarantee: ESC's geometric ensemble)
and, for its fused projection, a multiple of 16 channels. Elsewhere torch's operators run; :func:`status` says why
the kernels are or are not in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import stat
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import onednn, switches

__all__ = ["HEAD_DIM", "SymmetricKernel", "VARIANTS", "applies", "available", "conv_ffn", "cpu_variants", "fma_peak",
           "forced", "library_path", "linear_rows", "prepare_symmetric", "select", "status", "takes", "takes_ffn", "variant",
           "window_attention"]

#: The only head dimension the kernel takes (every ESC variant's: dim / heads = 16).
HEAD_DIM = 16
#: The profiler event each window-attention call records (the native calls are invisible to it otherwise).
WINDOW_ATTENTION_EVENT = "esc_native_window_attention"
LOG2_E = 1.4426950408889634
PACKAGE = Path(__file__).resolve().parent
KERNELS = PACKAGE / "kernels"
LIBRARY = PACKAGE / "_esc_kernels.so"
MANIFEST_NAME = "_esc_kernels.json"
#: The library's instruction-set variants, best first: each one's bit in ``esc_kernel_variants()`` and the
#: ``/proc/cpuinfo`` flags of its target (``kernels/target.h``: x86-64-v4 and x86-64-v3).
VARIANTS = {
    "avx512": (2, ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "f16c", "bmi1", "bmi2",
                   "abm", "movbe", "popcnt")),
    "avx2": (1, ("avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "popcnt")),
}
#: The variants used without ``ESC_RUNTIME_NATIVE`` asking: those measured against torch's operators. Which of their
#: kernels run by default is :data:`esc_runtime.layers.NATIVE_BY_DEFAULT` (by measurement, per variant).
DEFAULT_VARIANTS = ("avx512", "avx2")
ENV = "ESC_RUNTIME_NATIVE"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: Each kernel's C signature (every one returns int): the library must export ``<name>_<variant>`` for all of them.
SIGNATURES = {
    "esc_window_attention": [_P] * 3 + [_I] * 3 + [_F] * 3,
    "esc_conv_ffn": [_P] * 9 + [_I] * 3 + [_F] * 2 + [_P] * 2 + [ctypes.c_float, _F],
    "esc_symmetric_correlate": [_P] * 6 + [_I] * 3 + [_F] * 3,
    "esc_partial_conv_attention": [_P] * 10 + [_I] * 3 + [_F] * 4,
    "esc_linear_rows": [_P, _I, _F, _P, _P, _F, _P, _P, ctypes.c_float, _P, _P, _F],
    "esc_fma_peak": [_I, _P, _F],
}


class _Refused(Exception):
    """The library at hand is not loaded: a fault worth one warning (not a platform without it)."""


class _Kernels:
    """The chosen variant's functions of the loaded library, under their names without the variant."""

    def __init__(self, lib: ctypes.CDLL, variant: str) -> None:
        self.lib, self.variant = lib, variant
        for name, argtypes in SIGNATURES.items():
            function = getattr(lib, f"{name}_{variant}")
            function.restype, function.argtypes = ctypes.c_int, argtypes
            setattr(self, name, function)


def sources_digest(folder: Path = KERNELS) -> str:
    """SHA-256 over the kernel sources and headers, names and contents (as ``setup.py`` records it at the build)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return set(next((line for line in info if line.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return set()


def cpu_variants() -> tuple[str, ...]:
    """The variants this CPU runs (all of their target's flags in ``/proc/cpuinfo``), best first."""
    flags = _cpu_flags()
    return tuple(name for name, (_, needs) in VARIANTS.items() if set(needs) <= flags)


def _open_trusted(path: Path, what: str) -> int:
    """An open descriptor of ``path``, a regular file (not a link) of this user or root that only its owner can
    write, as is its folder; else :class:`_Refused`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise _Refused(f"{what} cannot be opened ({error.strerror or error})") from None
    try:
        for described, info in ((what, os.fstat(fd)), (f"its folder {path.parent}", os.stat(path.parent))):
            if described == what and not stat.S_ISREG(info.st_mode):
                raise _Refused(f"{what} is not a regular file")
            if info.st_uid not in (0, os.geteuid()):
                raise _Refused(f"{described} belongs to another user (uid {info.st_uid})")
            if info.st_mode & 0o022:
                raise _Refused(f"{described} is writable by {'group' if info.st_mode & 0o020 else 'others'} "
                               f"(mode {stat.S_IMODE(info.st_mode):o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as handle:
        return handle.read()


def _manifest(library: Path, *, trusted: bool = True) -> dict | None:
    """The build's record beside ``library`` (None where there is none), from a trusted file; untrusted: a first look
    that only says whether and why nothing was built (None for anything unreadable)."""
    path = library.with_name(MANIFEST_NAME)
    if not os.path.lexists(path):
        return None
    try:
        fd = _open_trusted(path, f"the build record {path.name}") if trusted else \
            os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        record = json.loads(_read_all(fd))
    except ValueError as error:
        if not trusted:
            return None
        raise _Refused(f"the build record {path.name} is not JSON ({error})") from None
    finally:
        os.close(fd)
    if not isinstance(record, dict):
        if not trusted:
            return None
        raise _Refused(f"the build record {path.name} is not a JSON object")
    return record


def _choice() -> tuple[str, str]:
    """What the environment asks for, and the setting that says so: ``off``, ``auto`` or a variant's name."""
    value = os.environ.get(ENV, "").strip().lower()
    if value:
        setting = f"{ENV}={value}"
        if value in switches.FALSE:
            return "off", setting
        if value in ("auto", *switches.TRUE):
            return "auto", setting
        return value, setting
    if not switches.enabled("ESC_SR_NATIVE"):
        return "off", f"ESC_SR_NATIVE={os.environ['ESC_SR_NATIVE'].strip()}"
    return "auto", ""


def _open_library(library: Path, choice: str, setting: str) -> tuple[_Kernels | None, str]:
    """The kernels of ``library`` for ``choice``, or None and why; raises :class:`_Refused` for a fault."""
    if choice == "off":
        return None, f"switched off ({setting})"
    machine = platform.machine().lower()
    if not (sys.platform.startswith("linux") and machine in ("x86_64", "amd64")):
        return None, f"not built on {sys.platform}/{machine} (the kernels are built for x86-64 Linux only)"
    if choice != "auto" and choice not in VARIANTS:
        raise _Refused(f"{setting} names no variant (0, auto or one of {', '.join(VARIANTS)})")
    first_look = _manifest(library, trusted=False)
    if not os.path.lexists(library):
        if first_look is None:
            return None, "not built at install (no build record: install the package with pip to build the kernels)"
        if not first_look.get("built"):
            return None, f"not built at install ({first_look.get('reason', 'no reason recorded')})"
    # which variants the build reports (None: no readable record, which the trusted read below refuses)
    runnable = cpu_variants()
    built = None if first_look is None else list(first_look.get("variants") or ())
    if choice == "auto":
        usable = [name for name in runnable if name in DEFAULT_VARIANTS]
        if not usable:
            forced = [name for name in runnable if built is None or name in built]
            hint = f"; {ENV}={forced[0]} forces the {forced[0]} variant" if forced else ""
            return None, (f"this CPU runs none of the variants used by default ({', '.join(DEFAULT_VARIANTS)}: "
                          f"where they were measured){hint}")
        chosen, why = usable[0], "the best this CPU runs"
        if built is not None and chosen not in built:
            reason = (first_look.get("not_built") or {}).get(chosen, "not compiled")
            return None, f"not built at install for {chosen} ({reason})"
    else:
        if choice not in runnable:
            raise _Refused(f"{setting} asks for a variant this CPU does not run (it lacks "
                           f"{', '.join(sorted(set(VARIANTS[choice][1]) - _cpu_flags()))})")
        chosen, why = choice, f"chosen by {setting}"
    record = _manifest(library)  # now from a trusted file, with the digest to check the library against
    if record is None:
        raise _Refused(f"there is no build record ({MANIFEST_NAME}) with the digest to check it against")
    if not record.get("built") or chosen not in (record.get("variants") or ()):
        raise _Refused(f"its build record {MANIFEST_NAME} names no build with the {chosen} variant "
                       f"({record.get('reason') or ', '.join(record.get('variants') or ()) or 'none'})")
    expected = record.get("sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise _Refused(f"its build record {MANIFEST_NAME} holds no SHA-256")
    if KERNELS.is_dir() and record.get("sources") != sources_digest():
        raise _Refused(f"it was built from other kernel sources than {KERNELS} holds (rebuild: pip install the "
                       f"package again)")
    fd = _open_trusted(library, "the file")
    try:
        if hashlib.sha256(_read_all(fd)).hexdigest() != expected:
            raise _Refused(f"its SHA-256 is not the one the build wrote in {MANIFEST_NAME} (a truncated, replaced "
                           f"or foreign file)")
        # load the bytes just hashed: the descriptor's file, whatever has happened to the path since
        proc = Path(f"/proc/self/fd/{fd}")
        try:
            lib = ctypes.CDLL(str(proc if proc.exists() else library))
        except OSError as error:
            raise _Refused(f"it does not load ({error})") from None
    finally:
        os.close(fd)
    missing = [name for name in ("esc_kernel_variants", *(f"{n}_{chosen}" for n in SIGNATURES))
               if not hasattr(lib, name)]
    if missing:
        raise _Refused(f"it lacks {', '.join(missing)}")
    lib.esc_kernel_variants.restype = ctypes.c_int
    if not lib.esc_kernel_variants() & VARIANTS[chosen][0]:
        raise _Refused(f"it does not hold the {chosen} variant")
    return _Kernels(lib, chosen), f"{chosen} variant ({why}) of {library}"


_state: tuple[_Kernels | None, str] | None = None
_library = LIBRARY
_override: tuple[str, str] | None = None
_lock = threading.Lock()


def _load() -> tuple[_Kernels | None, str]:
    """The loaded kernels, or None, and why (once per process, or per :func:`select`)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                choice, setting = _override or _choice()
                try:
                    _state = _open_library(_library, choice, setting)
                except _Refused as refusal:
                    _state = None, f"refused {_library}: {refusal}"
                    warnings.warn(f"esc_runtime: not loading the native CPU kernels {_library}: {refusal}; "
                                  f"torch's operators run instead", RuntimeWarning, stacklevel=3)
    return _state


def select(choice: str | None) -> str:
    """Choose the variant for this process, as ``ESC_RUNTIME_NATIVE`` does (``"0"``, ``"auto"``, ``"avx2"``,
    ``"avx512"``; None: the environment's choice again), load it and return :func:`status`. For tests and
    benchmarks: a layer already prepared keeps the implementation it was prepared with."""
    global _state, _override
    with _lock:
        _override = None if choice is None else (str(choice).strip().lower(), f"select({choice!r})")
        if _override is not None and _override[0] in ("0", "off"):
            _override = ("off", _override[1])
        _state = None
    return status()


def _load_from(path: str | os.PathLike, choice: str | None = None) -> str:
    """Tests only: use the library at ``path`` (its build record beside it) instead of the package's, with the same
    checks, and return :func:`status`."""
    global _library
    _library = Path(os.path.abspath(path))
    return select(choice)


def available() -> bool:
    """Whether this process runs the native kernels (the library is checked and loaded on the first call)."""
    return _load()[0] is not None


def status() -> str:
    """Why the native kernels are or are not in use, in one line."""
    return _load()[1]


def forced() -> bool:
    """Whether the variant in use was asked for (``ESC_RUNTIME_NATIVE=<variant>`` or :func:`select`), not chosen by
    default: then every kernel runs, whatever :data:`esc_runtime.layers.NATIVE_BY_DEFAULT` says of the variant."""
    state = _load()
    return state[0] is not None and "(chosen by " in state[1]


def variant() -> str | None:
    """The variant in use (``"avx512"`` or ``"avx2"``), or None where torch's operators run."""
    kernels = _load()[0]
    return None if kernels is None else kernels.variant


def library_path() -> Path:
    """Where the library is looked for: ``_esc_kernels.so`` in this package's folder."""
    return _library


def _inference(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` is one the kernels serve: float32 on the CPU, no autograd (forward mode included), not
    traced or exported, and the kernels available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
        and not onednn.tracing() and not onednn.transformed() and available()


def takes(device: torch.device | str, dtype: torch.dtype, *, head_dim: int, window: int) -> bool:
    """Whether attention inference on ``device``/``dtype`` with this head dimension and window runs natively."""
    return head_dim == HEAD_DIM and window % 16 == 0 and torch.device(device).type == "cpu" \
        and dtype == torch.float32 and available()


def applies(x: torch.Tensor, *, head_dim: int, window: int) -> bool:
    """Whether window attention over ``x`` (the layer's input) takes the kernel: :func:`takes`, without autograd and
    outside tracing or export."""
    return head_dim == HEAD_DIM and window % 16 == 0 and _inference(x)


def window_attention(qkv: torch.Tensor, table: torch.Tensor, *, batch: int, height: int, width: int, heads: int,
                     window: int) -> torch.Tensor:
    """Attend every window of a ``(batch, height, width)`` map (sides multiples of ``window``).

    ``qkv``: the ``to_qkv`` projection as raster-order rows ``(batch * height * width, 3 * heads * 16)``, contiguous;
    ``table``: the ``(heads, (2 window - 1)^2)`` relative-position bias table. Returns the attended rows
    ``(batch * height * width, heads * 16)`` in the same order, channels ``(head, c)``: what ``to_out`` reads.
    """
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    dim = heads * HEAD_DIM
    if qkv.shape != (batch * height * width, 3 * dim) or not qkv.is_contiguous() or qkv.dtype != torch.float32:
        raise ValueError(f"qkv must be contiguous float32 rows of shape {(batch * height * width, 3 * dim)}, "
                         f"got {tuple(qkv.shape)}")
    scaled_table = (table.detach().to(torch.float32) * LOG2_E).contiguous()  # scores are kept in base 2
    out = qkv.new_empty(batch * height * width, dim)
    with torch.profiler.record_function(WINDOW_ATTENTION_EVENT):
        code = lib.esc_window_attention(qkv.data_ptr(), scaled_table.data_ptr(), out.data_ptr(), batch, height,
                                        width, heads, window, torch.get_num_threads())
    if code == 1:
        raise ValueError(f"the native kernel does not take a {height}x{width} map with window {window}")
    if code == 2:
        raise MemoryError("the native window-attention kernel could not allocate its buffers")
    return out


def takes_ffn(x: torch.Tensor, *, channels: int, hidden: int, kernel_size: int) -> bool:
    """Whether a ConvFFN over ``x`` runs on the fused kernel: inference as for :func:`applies`, channels a multiple of
    16 (the hidden channels are padded to one), and a 3x3 depthwise convolution."""
    return channels % 16 == 0 and kernel_size == 3 and hidden > 0 and _inference(x)


def _padded(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``, contiguous."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim).contiguous()


def conv_ffn(x: torch.Tensor, expand: torch.nn.Conv2d, depthwise: torch.nn.Conv2d, project: torch.nn.Conv2d,
             add: torch.Tensor | None = None, *, norm: torch.nn.LayerNorm | None = None) -> torch.Tensor:
    """``project(GELU(depthwise(h)) + h) (+ add)`` with ``h = GELU(expand(norm(x)))``: ESC's ConvFFN (and the
    LayerNorm in front of it, per pixel over its channels, where given) in one fused pass.

    ``x`` and ``add``: ``(b, channels, h, w)`` maps (made channels-last); returns a channels-last map. The weights
    are transposed and their hidden channels padded to whole vectors of 16 for each call (a few small copies).
    """
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    b, c, h, w = x.shape
    hidden = expand.out_channels
    padded = -(-hidden // 16) * 16
    detach = [t.detach() for t in (expand.weight, expand.bias, depthwise.weight, depthwise.bias, project.weight,
                                   project.bias)]
    expand_t = _padded(detach[0].view(hidden, c).t(), padded, 1)
    expand_bias = _padded(detach[1], padded, 0)
    taps = _padded(detach[2].view(hidden, 9).t(), padded, 1)
    taps_bias = _padded(detach[3], padded, 0)
    project_t = _padded(detach[4].view(c, hidden).t(), padded, 0)
    project_bias = detach[5].contiguous()
    norm_weight = None if norm is None else norm.weight.detach().contiguous()
    norm_bias = None if norm is None else norm.bias.detach().contiguous()
    x = x.contiguous(memory_format=torch.channels_last)
    if add is not None:
        add = add.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    with torch.profiler.record_function("esc_native_conv_ffn"):
        code = lib.esc_conv_ffn(x.data_ptr(), expand_t.data_ptr(), expand_bias.data_ptr(), taps.data_ptr(),
                                taps_bias.data_ptr(), project_t.data_ptr(), project_bias.data_ptr(),
                                None if add is None else add.data_ptr(), out.data_ptr(), b, h, w, c, padded,
                                None if norm is None else norm_weight.data_ptr(),
                                None if norm is None else norm_bias.data_ptr(),
                                float(norm.eps) if norm is not None else 0.0, torch.get_num_threads())
    if code == 1:
        raise ValueError(f"the native ConvFFN does not take {c} channels ({hidden} hidden)")
    if code == 2:
        raise MemoryError("the native ConvFFN could not allocate its buffers")
    return out


def _orbits(kernel_size: int) -> torch.Tensor:
    """``(k, k)``: each offset's orbit under the square's flips and rotations, numbered as the kernel numbers them
    (``a (a + 1) / 2 + b`` with ``a >= b`` the offset's larger and smaller distance from the centre)."""
    r = torch.arange(kernel_size) - kernel_size // 2
    dy, dx = r.abs().view(-1, 1).expand(kernel_size, kernel_size), r.abs().view(1, -1).expand(kernel_size, kernel_size)
    a, b = torch.maximum(dy, dx), torch.minimum(dy, dx)
    return a * (a + 1) // 2 + b


class SymmetricKernel:
    """A large kernel that is the same at every position of each orbit of the square's symmetries (ESC's geometric
    ensemble), by orbit, for :func:`esc_runtime.native`'s correlation (``kernels/symmetric_conv.cpp``).

    Built once per forward pass (:func:`prepare_symmetric`); ``correlate`` does what ``F.conv2d(x, kernel,
    padding=k // 2)`` plus a per-sample depthwise 3x3 convolution do, as :class:`esc_runtime.spectral.SpectralKernel`.
    Each orbit's weight is the mean of the kernel over the orbit (equal to every member up to float rounding).
    """

    def __init__(self, kernel: torch.Tensor) -> None:
        self.kernel = kernel
        out_channels, in_channels, k, _ = kernel.shape
        self.padded = -(-in_channels // 16) * 16
        orbit = _orbits(k).flatten()
        count = int(orbit.max()) + 1
        taps = kernel.detach().float().permute(2, 3, 1, 0).reshape(k * k, in_channels, out_channels)
        means = taps.new_zeros(count, in_channels, out_channels).index_add_(0, orbit, taps)
        means /= torch.bincount(orbit, minlength=count).view(-1, 1, 1).to(means.dtype)
        weights = means.new_zeros(count, self.padded, self.padded)
        weights[:, :in_channels, :out_channels] = means
        self.weights = weights.view(count * self.padded, self.padded)

    def correlate(self, x: torch.Tensor, dynamic: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        """Write the correlation of ``x`` (``(b, c, h, w)``) plus each sample's depthwise 3x3 ``dynamic`` kernel
        (``(b, c, 3, 3)``, padding 1) into ``out`` (``(b, c, h, w)``); both with channels as their innermost axis."""
        lib = _load()[0]
        if lib is None:
            raise RuntimeError(f"the native CPU kernels are not available: {status()}")
        b, c, h, w = x.shape
        if x.stride(1) != 1:
            x = x.contiguous(memory_format=torch.channels_last)
        if out.stride(1) != 1:
            raise ValueError("out must have channels as its innermost axis (a channels-last map or a slice of one)")
        taps = self._taps(dynamic)  # held in a name: it must outlive the call
        strides = [(ctypes.c_int64 * 3)(t.stride(0), t.stride(2), t.stride(3)) for t in (x, out)]
        with torch.profiler.record_function("esc_native_symmetric_correlate"):
            code = lib.esc_symmetric_correlate(x.data_ptr(), strides[0], self.weights.data_ptr(), taps.data_ptr(),
                                               out.data_ptr(), strides[1], b, h, w, c, self.kernel.shape[-1] // 2,
                                               torch.get_num_threads())
        if code == 1:
            raise ValueError(f"the native correlation does not take a {tuple(x.shape)} map")
        if code == 2:
            raise MemoryError("the native correlation could not allocate its buffers")
        return out

    def _taps(self, dynamic: torch.Tensor) -> torch.Tensor:
        """``(b, c, 3, 3)`` per-sample kernels as the native code reads them: ``(b, 9, c padded to 16)``."""
        b, c = dynamic.shape[:2]
        taps = dynamic.new_zeros(b, 9, self.padded)
        taps[:, :, :c] = dynamic.detach().reshape(b, c, 9).transpose(1, 2)
        return taps

    def partial_conv_attention(self, x: torch.Tensor, dynamic: torch.Tensor, project: torch.nn.Conv2d,
                               add: torch.Tensor | None = None) -> torch.Tensor:
        """ESC's partial convolution and its 1x1 projection in one pass: ``project(cat([correlate(x[:, :c]) +
        depthwise(x[:, :c], dynamic), x[:, c:]])) (+ add)``, ``c`` the kernel's channels; returns a channels-last map.
        The concatenated map is never written (each row is projected from the core's cache)."""
        lib = _load()[0]
        if lib is None:
            raise RuntimeError(f"the native CPU kernels are not available: {status()}")
        b, dim, h, w = x.shape
        x = _pixels_last(x)
        add = None if add is None else _pixels_last(add)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        weight = project.weight.detach().reshape(dim, dim).t().contiguous()
        bias = project.bias.detach().contiguous()
        taps = self._taps(dynamic)  # every tensor passed by address is held in a name until the call returns
        strides = [(ctypes.c_int64 * 3)(t.stride(0), t.stride(2), t.stride(3)) for t in (x, x if add is None else add, out)]
        with torch.profiler.record_function("esc_native_partial_conv_attention"):
            code = lib.esc_partial_conv_attention(
                x.data_ptr(), strides[0], self.weights.data_ptr(), taps.data_ptr(), weight.data_ptr(),
                bias.data_ptr(), None if add is None else add.data_ptr(), strides[1], out.data_ptr(), strides[2], b, h,
                w, self.kernel.shape[0], dim, self.kernel.shape[-1] // 2, torch.get_num_threads())
        if code == 1:
            raise ValueError(f"the native partial convolution does not take {dim} channels with a "
                             f"{self.kernel.shape[0]}-channel kernel")
        if code == 2:
            raise MemoryError("the native partial convolution could not allocate its buffers")
        return out


def fma_peak(threads: int | None = None, *, seconds: float = 0.2) -> float:
    """The fused multiply-add peak of the variant in use, in GFLOP/s on ``threads`` threads (default torch's): 12
    independent register FMAs per round on each thread (``kernels/linear_rows.cpp``), the best of three runs of about
    ``seconds`` each. For ``benchmarks/flops.py``: how close a forward pass comes to the machine."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    threads = threads or torch.get_num_threads()
    sink = ctypes.c_float()

    def run(iterations: int) -> tuple[float, int]:
        start = time.perf_counter()
        lanes = lib.esc_fma_peak(iterations, ctypes.byref(sink), threads)
        return time.perf_counter() - start, lanes

    iterations = 1 << 14
    while run(iterations)[0] < seconds / 4 and iterations < 1 << 34:  # about `seconds` per run
        iterations *= 4
    return max(2 * 12 * lanes * iterations * threads / elapsed / 1e9
               for elapsed, lanes in (run(iterations) for _ in range(3)))


def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each pixel's channels consecutive (``stride(1) == 1``, ``stride(3) == channels``): as it is when it
    is a channels-last map or a tile cut from one, else a channels-last copy."""
    if x.stride(1) == 1 and x.stride(3) == x.shape[1]:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def prepare_symmetric(kernel: torch.Tensor, x: torch.Tensor) -> SymmetricKernel | None:
    """``kernel`` (``(c, c, k, k)``, symmetric under the square's flips and rotations: the caller's guarantee, as for
    ESC's geometric ensemble) by orbit, where the forward pass on ``x`` runs the native correlation; else None."""
    if kernel.dim() != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[-1] % 2 == 0 or kernel.shape[-1] < 3:
        return None
    if kernel.dtype != torch.float32 or not _inference(x):
        return None
    return SymmetricKernel(kernel)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, norm: torch.nn.LayerNorm | None = None,
                add: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x) @ weight.T + bias (+ add)`` for ``(rows, in)`` pixels: a 1x1 convolution (``weight`` ``(out, in)``,
    ``out`` a multiple of 16) on a channels-last map's rows, with its LayerNorm over each pixel's channels fused in
    front (never written out) and the residual added. Inference only, as every native call."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    rows, inputs = x.shape
    outputs = weight.shape[0]
    x = x.contiguous()
    weight_t = weight.detach().reshape(outputs, inputs).t().contiguous()
    bias = bias.detach().contiguous()
    norm_weight = None if norm is None else norm.weight.detach().contiguous()
    norm_bias = None if norm is None else norm.bias.detach().contiguous()
    add = None if add is None else add.contiguous()
    out = x.new_empty(rows, outputs)
    with torch.profiler.record_function("esc_native_linear_rows"):
        code = lib.esc_linear_rows(x.data_ptr(), rows, inputs, weight_t.data_ptr(), bias.data_ptr(), outputs,
                                   None if norm is None else norm_weight.data_ptr(),
                                   None if norm is None else norm_bias.data_ptr(),
                                   float(norm.eps) if norm is not None else 0.0,
                                   None if add is None else add.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if code == 1:
        raise ValueError(f"the native 1x1 convolution does not take {inputs} -> {outputs} channels")
    if code == 2:
        raise MemoryError("the native 1x1 convolution could not allocate its buffers")
    return out
