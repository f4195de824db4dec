"""The upscaling engine: kinds in = kinds out, the official padding, seamless tiles, OOM halving,
half precision, non-native scales and the arbitrary-scale (LTE) path.

Models are small random ESCs. Untrained ESCs have an all-zero dynamic-kernel predictor (upstream
zero-init), which would hide the one global operation of the network; :func:`with_dynamic_kernels`
gives it random weights so that tiling is tested against what trained models do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

import esc_arch
from esc_sr import engine, images, memory, tiling
from esc_sr.engine import DEFAULT_OVERLAP, EngineError, OutOfMemory, upscale
from golden import SHARED_DIR  # noqa: E402

SHARED = SHARED_DIR
PHOTO_1024x768 = SHARED / "data" / "train" / "SunHays80" / "aqueduct_sun_ancegghzusmmvzjn.jpg"


def with_dynamic_kernels(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give the (zero-initialised) dynamic-kernel predictors random weights, as training does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Sequential) and isinstance(module[0], nn.AdaptiveAvgPool2d):
                for tensor in (module[1].weight, module[-1].weight, module[-1].bias):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def tiny(scale: int = 2, **overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1)  # window 16
    return with_dynamic_kernels(esc_arch.esc_tiny(scale, **{**kwargs, **overrides}).eval())


@pytest.fixture(scope="module")
def model():
    return tiny()


def max_error_8bit(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


@pytest.fixture
def maps_do_not_fit(monkeypatch):
    """Memory too small for the whole feature maps of layer streaming: explicit tiles then run as crop-overlap tiles
    with a statistics pass (tests/test_streaming.py covers the streamed path)."""
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 1 << 20)


# ------------------------------------------------------------------------------ official padding


def test_untiled_run_is_the_papers_protocol_reflect_pad_run_crop(model):
    x = torch.rand(1, 3, 21, 37)
    with torch.no_grad():
        padded = F.pad(x, (0, 16 * 3 - 37, 0, 16 * 2 - 21), mode="reflect")
        expected = model(padded)[..., : 21 * 2, : 37 * 2].clamp(0, 1)
    out = upscale(model, x, tile=None)
    assert out.shape == (1, 3, 42, 74)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_reflect_pad_matches_torch_and_handles_images_smaller_than_the_pad():
    from esc_arch import pad_to_multiple

    x = torch.rand(1, 3, 20, 9)
    torch.testing.assert_close(pad_to_multiple(x, 8), F.pad(x, (0, 7, 0, 4), mode="reflect"))
    tiny_image = torch.rand(1, 3, 3, 1)  # torch's reflect padding would refuse this
    padded = pad_to_multiple(tiny_image, 16)
    assert padded.shape == (1, 3, 16, 16)
    assert torch.equal(padded[..., :3, :1], tiny_image) and torch.equal(padded[..., 4, 0], tiny_image[..., 0, 0])


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (16, 16), (17, 40)])
def test_any_size_works(model, size):
    out = upscale(model, torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * 2, size[1] * 2)


# ------------------------------------------------------------------------------------- seams


def test_tiles_of_a_1024x768_photo_match_the_untiled_result_within_1_of_255(maps_do_not_fit):
    photo = np.asarray(PILImage.open(PHOTO_1024x768).convert("RGB"))
    assert photo.shape == (768, 1024, 3)
    net = tiny()
    untiled = upscale(net, photo, tile=None)
    tiled = upscale(net, photo, tile=256)  # 12 tiles, default overlap
    assert tiled.shape == untiled.shape == (1536, 2048, 3)
    assert max_error_8bit(tiled, untiled) <= 1


def test_without_overlap_the_seams_show(maps_do_not_fit):
    """The context around tiles is what makes the seam test pass (so that test can fail)."""
    net = tiny()
    photo = np.asarray(PILImage.open(PHOTO_1024x768).convert("RGB"))[300:396, 400:528]
    untiled = upscale(net, photo, tile=None)
    assert max_error_8bit(upscale(net, photo, tile=32), untiled) <= 1
    assert max_error_8bit(upscale(net, photo, tile=32, overlap=0), untiled) > 1


class GlobalMeanShift(nn.Module):
    """A model with a strong global dependency: nearest x2 plus the image's mean minus 0.5."""

    scale, window_size, arch_name, hyperparameters = 2, 8, "ESC", {"dim": 4}

    def __init__(self):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 3, 1))
        nn.init.eye_(self.pool[1].weight.view(3, 3))
        nn.init.constant_(self.pool[1].bias, -0.5)

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest") + self.pool(x)


def test_every_tile_sees_the_whole_images_global_pool(monkeypatch):
    x = torch.rand(1, 3, 40, 56)
    x[..., :20] *= 0.2  # very different statistics from tile to tile
    net = GlobalMeanShift().eval()
    untiled = upscale(net, x, tile=None)
    torch.testing.assert_close(upscale(net, x, tile=8, overlap=0), untiled, atol=1e-6, rtol=0)
    # Without the statistics pass each tile would use its own mean: visible steps at tile borders.
    monkeypatch.setattr(tiling.GlobalPooling, "relevant", property(lambda self: False))
    assert float((upscale(net, x, tile=8, overlap=0) - untiled).abs().max()) > 0.1


def test_pools_that_cannot_change_the_output_cost_no_second_pass(maps_do_not_fit):
    untrained = esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1).eval()
    assert not tiling.GlobalPooling(untrained).relevant  # upstream zero-init of the predictor
    assert tiling.GlobalPooling(tiny()).relevant
    calls = []
    upscale(untrained, torch.rand(1, 3, 40, 40), tile=16, progress=lambda d, t: calls.append((d, t)))
    assert [c for c in calls if c[0] == c[1]] == [(9, 9)]


def test_crop_overlap_tiles_put_no_hook_on_the_shared_model():
    """Each tile runs a view of the model with its own global pools: the model itself, which other threads may be
    running, is never changed (no forward hook, no replaced module) during either pass, and the tiles still see the
    whole image's pool."""
    seen = []

    class Watched(GlobalMeanShift):
        def forward(self, x):
            seen.append(any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()))
            return super().forward(x)

    net = Watched().eval()
    x = torch.rand(1, 3, 40, 56)
    x[..., :20] *= 0.2
    untiled = upscale(net, x, tile=None)
    seen.clear()
    torch.testing.assert_close(upscale(net, x, tile=8, overlap=0), untiled, atol=1e-6, rtol=0)
    assert len(seen) == 2 * 35 and not any(seen)  # both passes over the 35 tiles, no hook at any time
    assert isinstance(net.pool[0], nn.AdaptiveAvgPool2d)


def test_one_model_upscales_correctly_from_two_threads_during_crop_overlap_tiling(maps_do_not_fit):
    """Issue 26: the statistics pass of one thread's tiled call must not reach another thread's calls on the same
    model (they used to raise an empty _StatisticsCollected or differ by up to 6e-3), nor theirs reach it."""
    import threading

    prepared, _, _ = engine.prepare_model(tiny(), "cpu", "fp32")
    a, b = torch.rand(1, 3, 40, 40), torch.rand(1, 3, 40, 40) * 0.3  # different statistics
    jobs = {"a tiled": (a, 16), "b tiled": (b, 16), "b untiled": (b, None)}
    sequential = {name: upscale(prepared, x, tile=tile) for name, (x, tile) in jobs.items()}
    results: dict[str, list] = {name: [] for name in jobs}
    start = threading.Barrier(2)

    def work(names: list[str]) -> None:
        start.wait()
        for _ in range(6):
            for name in names:
                x, tile = jobs[name]
                try:
                    results[name].append(upscale(prepared, x, tile=tile))
                except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                    results[name].append(exc)

    threads = [threading.Thread(target=work, args=(["a tiled"],)),
               threading.Thread(target=work, args=(["b untiled", "b tiled"],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, outs in results.items():
        assert len(outs) == 6
        for out in outs:
            assert isinstance(out, torch.Tensor), f"{name}: {out!r}"
            torch.testing.assert_close(out, sequential[name], atol=1e-6, rtol=0)


def test_tile_size_is_rounded_to_the_window(model):
    seen = []
    wrapped = Recording(model, seen)
    upscale(wrapped, torch.rand(1, 3, 40, 40), tile=20, overlap=0)  # 20 -> 16; padded to 48x48
    assert set(seen) == {(16, 16)} and len(seen) == 2 * 9  # statistics pass + output pass


# ---------------------------------------------------------------------------------- memory


class Recording(nn.Module):
    """Delegates to ``inner``; records input sizes; raises ``error`` for inputs above ``max_pixels``
    or on the call numbers in ``fail_calls``."""

    def __init__(self, inner, seen, *, max_pixels=None, error=None, fail_calls=()):
        super().__init__()
        self.inner, self.seen, self.max_pixels, self.error = inner, seen, max_pixels, error
        self.fail_calls = set(fail_calls)
        self.scale, self.window_size = inner.scale, inner.window_size
        self.arch_name, self.hyperparameters = inner.arch_name, inner.hyperparameters

        self.ran = []  # sizes that did not fail

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        too_big = self.max_pixels is not None and x.shape[-2] * x.shape[-1] > self.max_pixels
        if too_big or len(self.seen) in self.fail_calls:
            raise self.error
        self.ran.append(tuple(x.shape[-2:]))
        return self.inner(x)


OOM_ERRORS = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu-allocator": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
    ),
    "python": MemoryError(),
}


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
def test_out_of_memory_halves_the_tile_and_still_gives_the_right_image(kind):
    net = tiny(dim=8, pdim=4)
    x = torch.rand(1, 3, 40, 56)  # padded to 48x64
    reference = upscale(net, x, tile=None)
    seen = []
    flaky = Recording(net, seen, max_pixels=48 * 48, error=OOM_ERRORS[kind])
    with pytest.warns(RuntimeWarning, match="retrying with 32px tiles"):
        out = upscale(flaky, x, tile=64, overlap=16)
    assert seen[0] == (48, 64)  # one 64 px tile (the whole image) was tried first, and failed
    assert flaky.ran and max(h * w for h, w in flaky.ran) <= 48 * 48  # then only tiles that fit
    torch.testing.assert_close(out, reference, atol=2 / 255, rtol=0)


def test_tiles_finished_before_an_oom_are_kept():
    net = tiny(dim=8, pdim=4)
    x = torch.rand(1, 3, 64, 64)  # padded 64x64: 4 cores of 32, or 16 cores of 16
    seen = []
    flaky = Recording(net, seen, error=OOM_ERRORS["cuda"], fail_calls={3})
    with pytest.warns(RuntimeWarning):
        upscale(flaky, x, tile=32, overlap=0)
    # Two statistics-pass tiles done, the third failed; then 16 cores minus the 2x4 already done.
    # (After the OOM, the statistics pass finishes with small tiles, then the output pass runs.)
    statistics_pass_after_oom = 16 - 2 * 4
    output_pass = 16
    assert len(seen) == 3 + statistics_pass_after_oom + output_pass


def test_out_of_memory_at_the_smallest_tile_is_a_clear_error():
    net = tiny(dim=8, pdim=4)
    flaky = Recording(net, [], max_pixels=1, error=OOM_ERRORS["cpu-allocator"])
    with pytest.warns(RuntimeWarning), pytest.raises(OutOfMemory, match=r"smallest tile \(16x16 px\)"):
        upscale(flaky, torch.rand(1, 3, 40, 40), tile=32)
    with pytest.raises(OutOfMemory, match="without tiling.*enable tiling"):
        upscale(flaky, torch.rand(1, 3, 40, 40), tile=None)


def test_other_errors_are_not_mistaken_for_out_of_memory():
    net = tiny(dim=8, pdim=4)
    broken = Recording(net, [], max_pixels=1, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        upscale(broken, torch.rand(1, 3, 40, 40), tile=32)


def test_auto_tile_follows_free_memory(model, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 64 << 30)
    assert engine.auto_tile_size(model, cpu, torch.float32) == 512  # capped on CPU
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 200 << 20)
    small = engine.auto_tile_size(model, cpu, torch.float32)
    assert 16 <= small < 512 and small % 16 == 0
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 1 << 20)
    assert engine.auto_tile_size(model, cpu, torch.float32) == 16  # never below one window
    big = esc_arch.esc(4)
    assert engine.auto_tile_size(big, cpu, torch.float32) % 32 == 0


def test_is_out_of_memory_recognises_the_allocator_messages():
    assert all(engine.is_out_of_memory(e) for e in OOM_ERRORS.values())
    assert not engine.is_out_of_memory(RuntimeError("expected 3 channels"))
    assert not engine.is_out_of_memory(ValueError("out of memory"))


# --------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_is_close_to_fp32_and_leaves_the_model_alone(model, precision, device):
    x = torch.rand(1, 3, 32, 32)
    full = upscale(model, x, precision="fp32", device=device)
    half = upscale(model, x, precision=precision, device=device)
    assert half.dtype == torch.float32
    psnr = 10 * math.log10(1 / float(((half - full) ** 2).mean()))
    assert psnr > 35, psnr
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_half_precision_overflow_is_recomputed_in_fp32(model):
    class OverflowsInHalf(Recording):
        def forward(self, x):
            out = self.inner(x)
            return out * torch.inf if x.dtype == torch.float16 else out

    x = torch.rand(1, 3, 20, 20)
    with pytest.warns(RuntimeWarning, match="recomputing it in fp32"):
        out = upscale(OverflowsInHalf(model, []), x, precision="fp16")
    torch.testing.assert_close(out, upscale(model, x, precision="fp32"))


def test_precision_and_device_errors_are_clear(model):
    with pytest.raises(EngineError, match="unknown precision"):
        upscale(model, torch.rand(1, 3, 8, 8), precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no usable CUDA"):
            upscale(model, torch.rand(1, 3, 8, 8), device="cuda")
    assert engine.resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert engine.resolve_precision("auto", torch.device("cuda")) == torch.float16


# ------------------------------------------------------------------------------------- kinds


def test_tensors_keep_batch_layout_dtype(model):
    batch = torch.rand(2, 3, 12, 10, dtype=torch.float64)
    out = upscale(model, batch)
    assert out.shape == (2, 3, 24, 20) and out.dtype == torch.float64
    torch.testing.assert_close(out[1:], upscale(model, batch[1:]))
    chw = upscale(model, batch[0].float())
    assert chw.shape == (3, 24, 20)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_numpy_arrays_keep_dtype_and_layout(model, dtype):
    rng = np.random.default_rng(0)
    top = {np.uint8: 255, np.uint16: 65535}.get(dtype, 1)
    rgb = (rng.random((9, 11, 3)) * top).astype(dtype)
    for array, shape in ((rgb, (18, 22, 3)), (rgb[:, :, 0], (18, 22)), (rgb[:, :, :1], (18, 22, 1))):
        out = upscale(model, array)
        assert out.shape == shape and out.dtype == dtype


def test_numpy_result_equals_the_tensor_result(model):
    rgb = (np.random.default_rng(1).random((9, 11, 3)) * 255).astype(np.uint8)
    as_tensor = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255)[None]
    expected = images.from_float(upscale(model, as_tensor)[0].numpy().transpose(1, 2, 0), np.uint8)
    np.testing.assert_array_equal(upscale(model, rgb), expected)


def test_gray_goes_through_the_model_as_rgb(model):
    gray = torch.rand(1, 1, 10, 10)
    with torch.no_grad():
        rgb = model(F.pad(gray.expand(1, 3, 10, 10), (0, 6, 0, 6), mode="reflect"))[..., :20, :20]
    expected = rgb.mean(1, keepdim=True).clamp(0, 1)  # the three outputs averaged back to one channel
    torch.testing.assert_close(upscale(model, gray), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
def test_pil_images_come_back_as_pil_images_of_the_same_mode(model, mode):
    image = PILImage.new(mode, (9, 7), color=(120,) * len(mode))
    out = upscale(model, image)
    assert isinstance(out, PILImage.Image) and out.mode == mode and out.size == (18, 14)


def test_bad_arguments_raise_engine_errors(model):
    for bad in (torch.rand(1, 1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), np.zeros((4, 4, 5)), "x.png"):
        with pytest.raises(EngineError):
            upscale(model, bad)
    for tile in (-1, "big", True, 0):
        with pytest.raises(EngineError):
            upscale(model, torch.rand(1, 3, 8, 8), tile=tile)
    with pytest.raises(EngineError, match="alpha"):
        upscale(model, torch.rand(1, 3, 8, 8), alpha="drop")


def test_training_mode_is_restored(model):
    model.train()
    try:
        upscale(model, torch.rand(1, 3, 8, 8))
        assert model.training
    finally:
        model.eval()


def test_progress_callback_sees_every_tile(model, maps_do_not_fit):
    calls = []
    upscale(model, torch.rand(1, 3, 40, 40), tile=16, progress=lambda done, total: calls.append((done, total)))
    # Two sweeps over 3x3 tiles: statistics (the model has dynamic kernels), then output.
    finished = [c for c in calls if c[0] == c[1]]
    assert finished == [(9, 9), (9, 9)] and calls[0] == (0, 9)


# ---------------------------------------------------------------------------------- scales


def test_non_native_outscale_resizes_the_model_output(model):
    x = torch.rand(1, 3, 10, 14)
    native = upscale(model, x)
    out = upscale(model, x, outscale=3.0)
    assert out.shape == (1, 3, 30, 42)
    hwc = native[0].permute(1, 2, 0).numpy()
    expected = torch.from_numpy(images.resize(hwc, (42, 30)).transpose(2, 0, 1))[None]
    torch.testing.assert_close(out, expected)
    assert upscale(model, x, outscale=1.5).shape == (1, 3, 15, 21)


@pytest.fixture(scope="module")
def lte():
    torch.manual_seed(0)
    return with_dynamic_kernels(esc_arch.esc_lte(
        dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1, window_size=16, hidden_dim=32, mlp_hidden=(32,)
    ).eval())


def test_arbitrary_scale_model_takes_the_factor(lte):
    x = torch.rand(1, 3, 20, 26)
    out = upscale(lte, x, outscale=2.5, tile=None)
    assert out.shape == (1, 3, 50, 65)
    with torch.no_grad():
        torch.testing.assert_close(out, lte.upscale_by(x, 2.5).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(EngineError, match="needs outscale"):
        upscale(lte, x)


@pytest.mark.parametrize("factor", [1.7, 0.5])
def test_arbitrary_scale_tiles_decode_the_same_image(lte, factor, maps_do_not_fit):
    x = torch.rand(1, 3, 90, 75)
    whole = upscale(lte, x, outscale=factor, tile=None)
    tiled = upscale(lte, x, outscale=factor, tile=32, overlap=32)  # 3x3 tiles, corners see 64x64
    assert tiled.shape == whole.shape == (1, 3, round(90 * factor), round(75 * factor))
    assert float((tiled - whole).abs().max()) < 1 / 255


def test_a_model_whose_output_does_not_match_its_scale_is_a_clear_error(model):
    liar = Recording(model, [])
    liar.scale = 3  # the network really upscales x2
    with pytest.raises(EngineError, match=r"not x3 as its \.scale says"):
        upscale(liar, torch.rand(1, 3, 16, 16))


def test_auto_runs_untiled_when_the_image_fits_and_tiles_when_it_does_not(monkeypatch):
    """Untiled is the fastest run (no context computed twice, no statistics pass): 'auto' tiles only when it must."""
    torch.manual_seed(0)
    model = esc_arch.esc_tiny(2).eval()
    x = torch.rand(1, 3, 40, 72)
    calls: list[tuple[int, int]] = []
    out = upscale(model, x, tile="auto", progress=lambda done, total: calls.append((done, total)))
    assert {total for _, total in calls} == {1}  # one pass, one tile: the whole image
    assert (out - upscale(model, x, tile=None)).abs().max() == 0

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2 * 40 * 40 * memory.bytes_per_input_pixel(model, torch.float32))
    assert not engine.fits_untiled(model, torch.device("cpu"), torch.float32, 40, 72)
    calls.clear()
    tiled = upscale(model, x, tile="auto", progress=lambda done, total: calls.append((done, total)))
    assert max(total for _, total in calls) > 1
    assert (tiled - out).abs().max() <= 1 / 255


def test_auto_that_runs_out_of_memory_untiled_falls_back_to_exact_tiles():
    """An image 'auto' judged to fit, then out of memory: the tiles that replace the untiled run are exact (the
    result equals an explicitly tiled run): streamed, or crop-overlap tiles that get the whole-image statistics."""
    model = esc_arch.load_model("default")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tiled = upscale(model, x, tile=32, overlap=16)

    def out_of_memory_above_3000_px(_module, args):
        if args[0].ndim == 4 and args[0].shape[-2] * args[0].shape[-1] > 3000:
            raise torch.OutOfMemoryError("simulated out of memory")

    hooks = [m.register_forward_pre_hook(out_of_memory_above_3000_px) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with pytest.warns(RuntimeWarning, match="out of memory untiled; retrying with 32px tiles"):
            recovered = upscale(model, x, tile="auto", overlap=16)
    finally:
        for hook in hooks:
            hook.remove()
    assert (recovered - tiled).abs().max() == 0
