"""Layer-streamed tiling (esc_runtime.streaming): a prepared model runs every stage over all tiles before the next,
so tiles need no overlap and no statistics pass, and the result is the untiled one up to float rounding, for every
variant."""

from __future__ import annotations

import pytest
import torch

import esc_arch
import esc_runtime
from esc_runtime.streaming import WHOLE, TiledMaps, count_stages
from esc_sr import engine, memory, upscale
from golden import checkpoint_path, golden_cases

# One checkpoint per distinct forward pass: classic, FP, the real-world trunk with each kind of head, the
# pixel-unshuffled ESCRealM trunk (at x2 and x1), traiNNer's transpose+conv head, and the LTE encoder.
CASES = [
    "esc_x4", "esc_fp_x4", "esc_real_x4", "esc_real_dysample_x4", "escrealm_pixelshuffle_x3",
    "escrealm_nearestconv_x2_unshuffle", "escrealm_conv_x1_unshuffle", "trainner_escrealm_x4", "lte_esc",
]


def _load(case_id: str) -> torch.nn.Module:
    case = next(c for c in golden_cases() if c["id"] == case_id)
    return esc_arch.fuse(esc_arch.load_model(str(checkpoint_path(case))))


@pytest.mark.parametrize("case_id", CASES)
def test_streamed_forward_equals_the_whole_forward(case_id):
    model = _load(case_id)
    prepared = esc_runtime.prepare(model)
    forward = prepared.encode if model.arbitrary_scale else prepared
    ws = model.window_size
    # Sides that are not multiples of the window or of the tile: the last tiles hold partial windows.
    x = torch.rand(1, 3, 3 * ws + 4, 2 * ws + 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = forward(x)
        streamed = forward(x, TiledMaps(ws, window=ws))
    if model.arbitrary_scale:  # the coefficient and frequency maps
        whole, streamed = torch.cat(whole[1:3], 1), torch.cat(streamed[1:3], 1)
    assert streamed.shape == whole.shape
    assert float((streamed - whole).abs().max()) < 2e-5


def test_the_default_runner_runs_the_whole_maps():
    prepared = esc_runtime.prepare(_load("esc_x4"))
    x = torch.rand(1, 3, 40, 40)
    with torch.inference_mode():
        assert torch.equal(prepared(x), prepared(x, WHOLE))


def test_tiles_cover_the_grid_and_a_partial_last_window_gets_the_window_before_it():
    maps = TiledMaps(64, window=16)
    assert maps.boxes(128, 130) == [  # 130 = 2 tiles + 2 px: the last tile starts one window earlier
        (0, 64, 0, 64), (0, 64, 64, 128), (0, 64, 112, 130),
        (64, 128, 0, 64), (64, 128, 64, 128), (64, 128, 112, 130),
    ]
    assert maps.boxes(40, 40) == [(0, 40, 0, 40)]
    with pytest.raises(ValueError, match="multiple of the window"):
        TiledMaps(40, window=16)


def test_the_engine_streams_when_the_image_does_not_fit_untiled_but_its_feature_maps_do(monkeypatch):
    model = _load("esc_x4")
    x = torch.rand(1, 3, 96, 100, generator=torch.Generator().manual_seed(1))
    untiled = upscale(model, x, tile=None)
    maps = memory.streamed_map_bytes(model, torch.float32, 96, 128)
    # Room for the maps and a 32 px tile, far from room for the untiled run.
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2 * (maps + 64**2 * memory.bytes_per_input_pixel(model, torch.float32)))
    assert not engine.fits_untiled(model, torch.device("cpu"), torch.float32, 96, 100)
    calls = []
    streamed = upscale(model, x, tile="auto", progress=lambda done, total: calls.append((done, total)))
    stages = count_stages(esc_runtime.prepare(model))
    assert calls[-1] == (stages, stages)  # progress counts stages, each over all tiles
    assert float((streamed - untiled).abs().max()) < 1e-5  # exact: no overlap, no statistics pass


def test_streaming_that_runs_out_of_memory_falls_back_to_overlapping_tiles(monkeypatch):
    model = _load("esc_x4")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    untiled = upscale(model, x, tile=None)

    def out_of_memory(self, fn, *maps, radius):
        raise torch.OutOfMemoryError("simulated: the whole feature maps do not fit")

    monkeypatch.setattr(TiledMaps, "local", out_of_memory)
    with pytest.warns(RuntimeWarning, match="retrying with overlapping tiles"):
        tiled = upscale(model, x, tile=32)
    assert float((tiled - untiled).abs().max()) <= 1 / 255


def test_stage_count_does_not_depend_on_the_image():
    model = _load("esc_fp_x4")
    blocks, conv_blocks = model.hyperparameters["n_blocks"], model.hyperparameters["conv_blocks"]
    # stem, per block (FFN, attention, conv_blocks x (FFN, partial conv), output conv), head
    assert count_stages(esc_runtime.prepare(model)) == 1 + blocks * (3 + 2 * conv_blocks) + 1


@pytest.mark.parametrize("factor", [2.5, 0.75])
def test_the_arbitrary_scale_model_streams_its_encoder_and_decodes_every_pixel_once(factor):
    model = _load("lte_esc")
    x = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(3))
    untiled = upscale(model, x, outscale=factor, tile=None)
    calls = []
    streamed = upscale(model, x, outscale=factor, tile=32, progress=lambda done, total: calls.append((done, total)))
    stages = count_stages(esc_runtime.prepare(model))
    assert calls[-1] == (stages, stages)  # streamed, not crop-overlap tiles
    assert streamed.shape == untiled.shape == (1, 3, round(50 * factor), round(70 * factor))
    assert float((streamed - untiled).abs().max()) < 1e-5


def test_a_stage_may_write_its_output_over_a_map_it_reads_pointwise_or_window_by_window():
    from esc_arch.attention import WindowAttention
    from esc_runtime.layers import ATTENTION

    maps = TiledMaps(16, window=8)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 8, 37, 29, generator=generator), torch.rand(1, 8, 37, 29, generator=generator)
    conv = torch.nn.Conv2d(8, 8, 5, padding=2)
    attention = WindowAttention(8, 8, 2).eval()  # 37 x 29: the last tiles of both sides repeat a window
    with torch.inference_mode():
        residual = lambda t, u: conv(u) + t  # noqa: E731 - x only as the residual
        expected = residual(x, y)
        target = x.clone()
        out = maps.local(residual, target, y, radius=2, into=0)
        assert out.data_ptr() == target.data_ptr() and float((out - expected).abs().max()) < 1e-6

        windowed = lambda t: ATTENTION[-1](attention, t, add=t)  # noqa: E731 - read window by window at radius 0
        expected = windowed(x)
        target = x.clone()
        out = maps.local(windowed, target, radius=0, into=0)
        assert out.data_ptr() == target.data_ptr() and float((out - expected).abs().max()) < 1e-5
