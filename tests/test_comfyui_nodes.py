"""In-process tests of the ComfyUI nodes, with small stand-ins for ComfyUI's own modules.

ComfyUI's ``folder_paths``, ``comfy.model_management`` and ``comfy.utils`` exist only inside
ComfyUI, so each test gets explicit stand-ins (real modules, not mocks) that behave like the
0.3.x originals for what the nodes use: a real temp ``upscale_models`` folder, the CPU as
device, a recording ProgressBar, a Cancel flag and memory calls that are logged.  The real
server is exercised in ``test_comfyui_server.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from esc_sr.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()  # spandrel imports torchvision; PyPI's needs this next to a CPU torch

import esc_arch  # noqa: E402
import esc_sr
from esc_sr import engine  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ ComfyUI stand-ins


class InterruptProcessingException(Exception):
    """Stand-in for comfy.model_management.InterruptProcessingException."""


class FakeComfy:
    """The state behind the stand-in modules, for tests to steer and inspect."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.free_memory_calls: list[tuple[float, torch.device]] = []
        self.empty_cache_calls = 0
        self.interrupt_after_checks: int | None = None
        self.interrupt_checks = 0
        self.progress: list[tuple[int, int]] = []
        self.fp16_ok = False

    def modules(self) -> dict[str, types.ModuleType]:
        fake = self

        folder_paths = types.ModuleType("folder_paths")

        def get_filename_list(folder):
            assert folder == "upscale_models"
            return sorted(p.name for p in fake.models_dir.iterdir())

        def get_full_path(folder, name):
            path = fake.models_dir / name
            return str(path) if folder == "upscale_models" and path.is_file() else None

        folder_paths.get_filename_list = get_filename_list
        folder_paths.get_full_path = get_full_path

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = InterruptProcessingException
        mm.OOM_EXCEPTION = torch.OutOfMemoryError
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.free_memory = lambda required, device, keep_loaded=(): fake.free_memory_calls.append((required, device))
        mm.should_use_fp16 = lambda device=None, model_params=0, prioritize_performance=True, manual_cast=False: fake.fp16_ok
        mm.should_use_bf16 = lambda device=None, model_params=0, prioritize_performance=True, manual_cast=False: False

        def soft_empty_cache(force=False):
            fake.empty_cache_calls += 1

        def throw_exception_if_processing_interrupted():
            fake.interrupt_checks += 1
            if fake.interrupt_after_checks is not None and fake.interrupt_checks > fake.interrupt_after_checks:
                raise InterruptProcessingException()

        mm.soft_empty_cache = soft_empty_cache
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((value, total if total is not None else self.total))

        utils.ProgressBar = ProgressBar

        comfy = types.ModuleType("comfy")
        comfy.__path__ = []  # a package, so `comfy.model_patcher` is looked up (and not found) normally
        comfy.model_management, comfy.utils = mm, utils
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils}


@pytest.fixture
def comfy(tmp_path, monkeypatch) -> FakeComfy:
    models_dir = tmp_path / "upscale_models"
    models_dir.mkdir()
    fake = FakeComfy(models_dir)
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


@pytest.fixture
def nodes(comfy):
    import comfyui_nodes.nodes as nodes_module

    return nodes_module


@pytest.fixture
def esc_x2(comfy) -> str:
    torch.manual_seed(0)
    esc_sr.save_model(esc_arch.esc_tiny(scale=2), comfy.models_dir / "tiny_x2.safetensors")
    return "tiny_x2.safetensors"


@pytest.fixture
def lte(comfy) -> str:
    torch.manual_seed(1)
    model = esc_arch.esc_lte(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                             hidden_dim=32, mlp_hidden=(32, 32))
    esc_sr.save_model(model, comfy.models_dir / "lte.safetensors")
    return "lte.safetensors"


def comfy_image(height: int, width: int, channels: int = 3, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE: [B, H, W, C] float in 0..1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, height, width, channels), generator=generator)


def _first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The model's first convolution, run for every tile: where a test makes a run fail (the engine
    runs a prepared model, esc_runtime.prepare, which calls the layers but not the model's own forward)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def direct(model: torch.nn.Module, image_bhwc: torch.Tensor, **kwargs) -> torch.Tensor:
    """The engine run directly on the same image, back in ComfyUI's BHWC layout."""
    out = esc_sr.upscale(model, image_bhwc.movedim(-1, 1), device="cpu", precision="fp32", **kwargs)
    return out.movedim(1, -1)


# ------------------------------------------------------------------------------------ registration


def test_node_mappings_name_every_node_in_the_upscaling_category(nodes):
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == {
        "ESCModelLoader", "ESCUpscaleImage", "ESCUpscaleImageByFactor"}
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ESCUpscaleImageByFactor"] == "Upscale Image by Factor (ESC arbitrary-scale)"
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "image/upscaling"
        assert callable(getattr(cls(), cls.FUNCTION))
        assert "required" in cls.INPUT_TYPES()
    assert nodes.UpscaleImageESC.RETURN_TYPES == ("IMAGE", "MASK")
    assert nodes.LoadESCModel.RETURN_TYPES == ("UPSCALE_MODEL",)


EMBEDDED = ["[embedded] default", "[embedded] real"]


def test_loader_lists_the_files_of_upscale_models_on_every_call(nodes, comfy, esc_x2):
    assert nodes.LoadESCModel.INPUT_TYPES()["required"]["model_name"][0] == [esc_x2, *EMBEDDED]
    (comfy.models_dir / "later.pth").write_bytes(b"")
    assert nodes.LoadESCModel.INPUT_TYPES()["required"]["model_name"][0] == ["later.pth", esc_x2, *EMBEDDED]


@pytest.mark.parametrize("name", sorted(esc_arch.EMBEDDED_MODELS))
def test_loader_lists_and_loads_every_embedded_model(nodes, name):
    """The embedded models (esc_arch.EMBEDDED_MODELS: 'default' and 'real') are choices of the loader."""
    assert f"[embedded] {name}" in nodes.LoadESCModel.INPUT_TYPES()["required"]["model_name"][0]
    (descriptor,) = nodes.LoadESCModel().load(f"[embedded] {name}")
    expected = esc_arch.load_model(name)
    assert descriptor.model.arch_name == expected.arch_name and descriptor.scale == 4
    for key, value in expected.state_dict().items():
        assert torch.equal(descriptor.model.state_dict()[key], value)
    image = comfy_image(20, 24)
    out, _ = nodes.UpscaleImageESC().upscale(descriptor, image, precision="fp32")
    assert out.shape == (1, 80, 96, 3)


def test_loader_does_not_take_other_names_for_embedded_models(nodes):
    with pytest.raises(FileNotFoundError, match="no such file"):
        nodes.LoadESCModel().load("[embedded] nothing")


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_upscale_refuses_images_that_are_not_rgb_or_rgba_in_one_line(nodes, esc_x2, channels):
    """Issue 26: 2 channels came back with 2 channels and an empty mask, 5 silently lost 2."""
    (model,) = nodes.LoadESCModel().load(esc_x2)
    with pytest.raises(ValueError, match=f"the IMAGE has {channels} channels? .*RGB or RGBA") as caught:
        nodes.UpscaleImageESC().upscale(model, comfy_image(10, 12, channels=channels))
    assert "\n" not in str(caught.value)


def test_nan_in_the_mask_is_reported_as_the_mask(nodes, esc_x2):
    """Issue 26: NaN in the MASK was reported as 'the image has 256 non-finite pixel values'."""
    (model,) = nodes.LoadESCModel().load(esc_x2)
    image = comfy_image(16, 16)
    mask = torch.full((1, 16, 16), 0.25)
    mask[0, :4, :4] = float("nan")
    with pytest.warns(RuntimeWarning) as caught:
        out, mask_out = nodes.UpscaleImageESC().upscale(model, image, mask=mask, precision="fp32")
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("the MASK has 16 non-finite values") for m in messages), messages
    assert not any("image" in m for m in messages), messages
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(mask_out).all())


def test_repo_root_loads_like_comfyui_loads_a_custom_node_folder(comfy):
    """ComfyUI imports <pack>/__init__.py under a path-derived name; without the V3 schema (no comfy_api here) it
    exports the V1 mappings and no entry point."""
    import spandrel

    spec = importlib.util.spec_from_file_location("custom_nodes_x_esc_test", REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a second import of the pack must not raise (idempotent registration)
    import comfyui_nodes

    assert comfyui_nodes.NODE_API == "v1" and not hasattr(module, "comfy_entrypoint")
    assert module.NODE_CLASS_MAPPINGS is comfyui_nodes.NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS["ESCModelLoader"] == "Load ESC Model"
    ids = [support.architecture.id for support in spandrel.MAIN_REGISTRY.architectures()]
    assert "ESC" in ids and len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------------ loader


def test_loader_returns_a_spandrel_descriptor_with_the_chosen_attention(nodes, esc_x2):
    import spandrel

    (descriptor,) = nodes.LoadESCModel().load(esc_x2, attention="naive", precision="bf16")
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert descriptor.scale == 2 and descriptor.model.arch_name == "ESC"
    assert descriptor.model.attn_type == "naive"
    assert descriptor.esc_precision == "bf16"
    assert not descriptor.model.training


def test_loader_output_runs_the_way_the_stock_upscale_node_calls_it(nodes, comfy, esc_x2):
    """Stock ImageUpscaleWithModel calls the descriptor on BCHW tiles: same result as the engine.

    (On a multiple of the window: elsewhere the network pads inside each attention layer while
    the engine pads the image, the paper's evaluation protocol, and the borders differ.)
    """
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    lr = comfy_image(16, 32).movedim(-1, 1)
    with torch.inference_mode():
        stock_style = descriptor(lr)
    expected = esc_sr.upscale(esc_arch.load_model(comfy.models_dir / esc_x2), lr, tile=None, device="cpu")
    assert stock_style.shape == (1, 3, 32, 64)
    torch.testing.assert_close(stock_style, expected, atol=1e-5, rtol=0)


def test_loader_attaches_a_patcher_where_comfyui_has_one(nodes, comfy, esc_x2, monkeypatch):
    patcher_module = types.ModuleType("comfy.model_patcher")

    class CoreModelPatcher:
        def __init__(self, model, load_device, offload_device, **kwargs):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    patcher_module.CoreModelPatcher = CoreModelPatcher
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher_module)
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    assert isinstance(descriptor.patcher, CoreModelPatcher)
    assert descriptor.patcher.model is descriptor.model
    assert descriptor.patcher.load_device == torch.device("cpu")


def test_loader_without_patcher_support_attaches_none(nodes, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    assert not hasattr(descriptor, "patcher")


def test_loader_describes_the_arbitrary_scale_model_as_x4_for_the_stock_node(nodes, lte):
    """Like spandrel's ESC registration: ESC-LTE is a x4 descriptor whose call renders x4."""
    (descriptor,) = nodes.LoadESCModel().load(lte)
    assert descriptor.model.arch_name == "ESCLTE" and descriptor.scale == 4
    lr = comfy_image(8, 10).movedim(-1, 1)
    with torch.inference_mode():
        out = descriptor(lr)
        expected = descriptor.model.upscale_by(lr, 4)
    assert out.shape == (1, 3, 32, 40)
    torch.testing.assert_close(out, expected.clamp(0, 1), atol=1e-6, rtol=0)


def test_loader_reports_a_broken_file_by_name(nodes, comfy):
    (comfy.models_dir / "broken.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(esc_arch.CheckpointError, match="broken.pth"):
        nodes.LoadESCModel().load("broken.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        nodes.LoadESCModel().load("missing.pth")


# ------------------------------------------------------------------------------------- upscaling


def test_upscale_node_equals_the_engine_and_reports_progress(nodes, comfy, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    image = comfy_image(14, 30, batch=2)  # two 16 px tiles per image
    out, mask = nodes.UpscaleImageESC().upscale(descriptor, image, tile_size=16, overlap=8)
    assert out.shape == (2, 28, 60, 3) and mask.shape == (2, 28, 60)
    assert not mask.any()  # no alpha: an all-opaque mask
    torch.testing.assert_close(out, direct(descriptor.model, image, tile=16, overlap=8), atol=1e-6, rtol=0)
    assert comfy.progress[-1][0] == comfy.progress[-1][1] > 1  # one bar step per tile, ending full
    assert comfy.free_memory_calls and comfy.free_memory_calls[0][1] == torch.device("cpu")


def test_upscale_node_float_output_scale_resizes_a_fixed_scale_model(nodes, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    image = comfy_image(20, 30)
    out, _ = nodes.UpscaleImageESC().upscale(descriptor, image, output_scale=1.5)
    assert out.shape == (1, 30, 45, 3)
    torch.testing.assert_close(out, direct(descriptor.model, image, outscale=1.5), atol=1e-6, rtol=0)


def test_rgba_image_keeps_its_alpha_channel(nodes, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    image = comfy_image(18, 22, channels=4)
    out, mask = nodes.UpscaleImageESC().upscale(descriptor, image, alpha_upscale="resize")
    assert out.shape == (1, 36, 44, 4)
    torch.testing.assert_close(out, direct(descriptor.model, image, alpha="resize"), atol=1e-6, rtol=0)
    torch.testing.assert_close(mask, 1.0 - out[..., 3])


def test_rgb_image_with_mask_gets_an_upscaled_mask(nodes, esc_x2):
    """LoadImage's (RGB IMAGE, MASK = 1 - alpha) pair: the mask is upscaled as alpha by the model."""
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    rgba = comfy_image(18, 22, channels=4, seed=3)
    out, mask = nodes.UpscaleImageESC().upscale(descriptor, rgba[..., :3], mask=1.0 - rgba[..., 3])
    assert out.shape == (1, 36, 44, 3) and mask.shape == (1, 36, 44)
    expected = direct(descriptor.model, rgba, alpha="model")
    torch.testing.assert_close(out, expected[..., :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(mask, 1.0 - expected[..., 3], atol=1e-6, rtol=0)


def test_loadimage_default_mask_means_opaque(nodes, esc_x2):
    """LoadImage gives a 64x64 zero mask for images without alpha: treated as fully opaque."""
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    image = comfy_image(12, 20)
    out, mask = nodes.UpscaleImageESC().upscale(descriptor, image, mask=torch.zeros(1, 64, 64))
    assert out.shape == (1, 24, 40, 3)
    assert not mask.any()


def test_arbitrary_scale_node_renders_any_factor(nodes, lte):
    (descriptor,) = nodes.LoadESCModel().load(lte)
    image = comfy_image(16, 20)
    out, _ = nodes.UpscaleImageByFactorESC().upscale(descriptor, image, factor=2.5)
    assert out.shape == (1, 40, 50, 3)
    torch.testing.assert_close(out, direct(descriptor.model, image, outscale=2.5), atol=1e-6, rtol=0)


def test_arbitrary_scale_node_rejects_fixed_scale_models(nodes, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    with pytest.raises(ValueError, match="ESC-LTE"):
        nodes.UpscaleImageByFactorESC().upscale(descriptor, comfy_image(8, 8), factor=2.5)


def test_upscale_node_runs_the_arbitrary_scale_model_at_its_declared_x4_or_any_output_scale(nodes, lte):
    (descriptor,) = nodes.LoadESCModel().load(lte)
    image = comfy_image(8, 10)
    out, _ = nodes.UpscaleImageESC().upscale(descriptor, image)
    assert out.shape == (1, 32, 40, 3)
    out, _ = nodes.UpscaleImageESC().upscale(descriptor, image, output_scale=1.7)
    assert out.shape == (1, 14, 17, 3)
    torch.testing.assert_close(out, direct(descriptor.model, image, outscale=1.7), atol=1e-6, rtol=0)


def test_upscale_node_refuses_non_esc_models_clearly(nodes):
    foreign = types.SimpleNamespace(model=torch.nn.Conv2d(3, 3, 1), scale=1)
    with pytest.raises(TypeError, match="need an ESC model"):
        nodes.UpscaleImageESC().upscale(foreign, comfy_image(8, 8))


def test_cancel_stops_the_upscale_between_tiles(nodes, comfy, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    forward_calls = []
    _first_layer(descriptor.model).register_forward_pre_hook(lambda module, args: forward_calls.append(1))
    comfy.interrupt_after_checks = 3  # the node checks before starting and at every progress step
    with pytest.raises(InterruptProcessingException):
        nodes.UpscaleImageESC().upscale(descriptor, comfy_image(64, 64), tile_size=16, overlap=0)
    done, total = comfy.progress[-1]
    assert forward_calls and done < total // 2  # stopped long before the 16 tiles were done (tiles x stages, streamed)


def test_out_of_memory_asks_comfyui_to_free_memory_and_retries(nodes, comfy, esc_x2):
    """The engine halves the tile on OOM; if even the smallest tile fails, ComfyUI unloads everything else."""
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)
    image = comfy_image(32, 32)

    def out_of_memory_until_freed(module, args):
        if not any(required >= 1e30 for required, _ in comfy.free_memory_calls):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = _first_layer(descriptor.model).register_forward_pre_hook(out_of_memory_until_freed)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out, _ = nodes.UpscaleImageESC().upscale(descriptor, image, tile_size=32)
    hook.remove()
    assert any(required >= 1e30 for required, _ in comfy.free_memory_calls)
    torch.testing.assert_close(out, direct(descriptor.model, image, tile=32), atol=1e-6, rtol=0)


def test_out_of_memory_that_persists_is_raised(nodes, comfy, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)

    def always_out_of_memory(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    _first_layer(descriptor.model).register_forward_pre_hook(always_out_of_memory)
    with pytest.warns(RuntimeWarning), pytest.raises(engine.OutOfMemory):
        nodes.UpscaleImageESC().upscale(descriptor, comfy_image(16, 16), tile_size=16)


def test_other_errors_are_not_mistaken_for_out_of_memory(nodes, comfy, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2)

    def broken(module, args):
        raise ValueError("something else")

    _first_layer(descriptor.model).register_forward_pre_hook(broken)
    with pytest.raises(ValueError, match="something else"):
        nodes.UpscaleImageESC().upscale(descriptor, comfy_image(16, 16))
    assert not any(required >= 1e30 for required, _ in comfy.free_memory_calls)


# ------------------------------------------------------------------------------------- precision


def test_precision_auto_follows_loader_then_comfyui(nodes, comfy):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    stock_loaded = types.SimpleNamespace(model=esc_arch.esc_tiny())
    assert nodes._resolve_precision("auto", stock_loaded, cpu) == "fp32"
    assert nodes._resolve_precision("fp16", stock_loaded, cpu) == "fp16"  # explicit wins (the engine validates it)
    ours = types.SimpleNamespace(model=esc_arch.esc_tiny(), esc_precision="bf16")
    assert nodes._resolve_precision("auto", ours, cuda) == "bf16"
    assert nodes._resolve_precision("auto", stock_loaded, cuda) == "fp32"  # ComfyUI advises against fp16 here
    comfy.fp16_ok = True
    assert nodes._resolve_precision("auto", stock_loaded, cuda) == "fp16"


def test_precision_auto_keeps_a_model_that_needs_fp32_in_fp32(nodes, comfy):
    """ESC-LTE's decoder is inaccurate in half precision (esc_arch states it: supports_half = False), so "auto"
    stays fp32 even where ComfyUI would run fp16."""
    comfy.fp16_ok = True
    lte = types.SimpleNamespace(model=esc_arch.esc_lte(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8,
                                                       num_heads=2, hidden_dim=32, mlp_hidden=(32, 32)))
    assert nodes._resolve_precision("auto", lte, torch.device("cuda")) == "fp32"
    assert nodes._resolve_precision("auto", types.SimpleNamespace(model=esc_arch.esc_tiny()), torch.device("cuda")) == "fp16"


def test_loader_precision_is_used_by_the_upscale_node(nodes, esc_x2):
    (descriptor,) = nodes.LoadESCModel().load(esc_x2, precision="bf16")
    image = comfy_image(16, 16)
    out, _ = nodes.UpscaleImageESC().upscale(descriptor, image)
    bf16 = esc_sr.upscale(descriptor.model, image.movedim(-1, 1), device="cpu", precision="bf16").movedim(1, -1)
    fp32 = direct(descriptor.model, image)
    torch.testing.assert_close(out, bf16, atol=1e-6, rtol=0)
    assert not torch.allclose(out, fp32, atol=1e-4)  # it really ran in bf16
    assert np.isfinite(out.numpy()).all()


# ------------------------------------------------------------------------- ComfyUI's inference mode


def test_nodes_work_inside_comfyuis_inference_mode(nodes, esc_x2):
    """ComfyUI runs every node under torch.inference_mode(), the loader included."""
    image = comfy_image(16, 16)
    with torch.inference_mode():
        (descriptor,) = nodes.LoadESCModel().load(esc_x2, precision="bf16")  # bf16: the engine copies the model
        out, _ = nodes.UpscaleImageESC().upscale(descriptor, image, tile_size=16)
        again, _ = nodes.UpscaleImageESC().upscale(descriptor, image, tile_size=16)  # cached tensors reused
    assert not any(p.is_inference() for p in descriptor.model.parameters())
    torch.testing.assert_close(out, again)
    assert out.shape == (1, 32, 32, 3)
