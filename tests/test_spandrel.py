"""ESC in spandrel: after `esc_arch.spandrel.install()`, plain `spandrel.ModelLoader` loads every ESC
checkpoint and the descriptor computes what `esc_arch.load_model` computes.  The tests mirror
spandrel's own conventions (tests/util.py there): state-dict round trips with equal
hyperparameters, a safetensors round trip, size requirements over candidate sizes, and a snapshot
of the descriptor fields."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import esc_arch
import esc_sr
from esc_sr.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()  # spandrel imports torchvision (PyPI's CUDA wheel next to the CPU torch here)

import esc_arch.spandrel as esc_spandrel  # noqa: E402
from esc_arch.spandrel import ESC_REGISTRY, LTE_SCALE, install

import spandrel.architectures as builtin
import spandrel_extra_arches.architectures as extra
from spandrel import MAIN_REGISTRY, ArchRegistry, ModelLoader, ModelTiling, SizeRequirements, canonicalize_state_dict
from spandrel_extra_arches import EXTRA_REGISTRY

from golden import GOLDEN_DIR, golden_cases

CASES = [case["id"] for case in golden_cases()]
ESC_IDS = {support.architecture.id for support in ESC_REGISTRY}
DOWNSCALER = "escrealm_conv_x1_unshuffle"  # the 'conv' head after a x4 unshuffle: output is 1/4 size


@pytest.fixture(autouse=True, scope="module")
def _installed():
    install()


def _checkpoint(case_id: str):
    return next(GOLDEN_DIR.glob(f"{case_id}.ckpt.*"))


def _small_input(case_id: str) -> torch.Tensor:
    # Sides above half of every padding multiple (the window, up to 48 here): spandrel's
    # reflect padding and esc_arch's agree there (for tinier images spandrel replicates the rest).
    generator = torch.Generator().manual_seed(sum(map(ord, case_id)))
    return torch.rand(1, 3, 37, 45, generator=generator)


def _reference(model, x: torch.Tensor) -> torch.Tensor:
    """What esc_arch gives: the engine (image reflect-padded to the window, the paper's protocol)."""
    with torch.no_grad():
        if model.arch_name == "ESCLTE":
            return model.upscale_by(x, LTE_SCALE).clamp(0, 1)
        return esc_sr.upscale(model, x, tile=None, precision="fp32").clamp(0, 1)


# -- loading every checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("case_id", [c for c in CASES if c != DOWNSCALER])
def test_model_loader_loads_every_golden_checkpoint_like_load_model(case_id, tmp_path) -> None:
    path = _checkpoint(case_id)
    reference = esc_arch.load_model(path)
    converted = esc_sr.save_model(reference, tmp_path / f"{case_id}.safetensors")
    x = _small_input(case_id)
    expected = _reference(reference, x)

    for file in (path, converted):
        descriptor = ModelLoader().load_from_file(file)
        assert descriptor.architecture.id == reference.arch_name
        got = descriptor(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4, file


def test_bare_safetensors_state_dict_loads_too(tmp_path) -> None:
    """What traiNNer-redux and most tools write: the bare state dict, no metadata."""
    state = esc_arch.read_state_dict(_checkpoint("esc_light_x2"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bare.safetensors")

    descriptor = ModelLoader().load_from_file(tmp_path / "bare.safetensors")

    assert (descriptor.architecture.id, descriptor.scale) == ("ESC", 2)


def test_a_model_that_shrinks_the_image_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"changes the image size by 0\.25x; spandrel can only describe"):
        ModelLoader().load_from_file(_checkpoint(DOWNSCALER))


# -- detection claims nothing else ----------------------------------------------------------------


def _state_dicts_of_every_case():
    for case_id in CASES:
        state = torch.load(_checkpoint(case_id), map_location="cpu", weights_only=True) if str(
            _checkpoint(case_id)
        ).endswith(".pth") else safetensors.torch.load_file(_checkpoint(case_id))
        yield case_id, canonicalize_state_dict(state)


def test_no_other_architecture_claims_an_esc_state_dict() -> None:
    others = [s for s in MAIN_REGISTRY.architectures("detection") if s.architecture.id not in ESC_IDS]
    others += list(EXTRA_REGISTRY)
    assert len(others) > 40
    for case_id, state in _state_dicts_of_every_case():
        claimed = [s.architecture.id for s in others if s.detect(state)]
        assert claimed == [], f"{case_id} claimed by {claimed}"


def test_exactly_the_right_esc_architecture_detects_each_case() -> None:
    for case_id, state in _state_dicts_of_every_case():
        expected = esc_arch.load_model(esc_arch.read_state_dict(_checkpoint(case_id))).arch_name
        first = next(s.architecture.id for s in ESC_REGISTRY.architectures("detection") if s.detect(state))
        assert first == expected, case_id


# Spandrel's own architectures, built from their own classes with small hyperparameters.
OTHER_MODELS = {
    "SPAN": lambda: builtin.SPAN.SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
    "PLKSR": lambda: builtin.PLKSR.PLKSR(dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7),
    "RealPLKSR": lambda: builtin.PLKSR.RealPLKSR(dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7),
    "RealPLKSR-DySample": lambda: builtin.PLKSR.RealPLKSR(dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7, dysample=True),
    "Compact": lambda: builtin.Compact.Compact(num_feat=8, num_conv=2, upscale=2),
    "ESRGAN": lambda: builtin.ESRGAN.ESRGAN(num_filters=8, num_blocks=1, scale=2),
    "SwinIR": lambda: builtin.SwinIR.SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[1], window_size=4, upscale=2, upsampler="pixelshuffle"),
    "Swin2SR": lambda: builtin.Swin2SR.Swin2SR(img_size=16, embed_dim=12, depths=[1], num_heads=[1], window_size=4, upscale=2, upsampler="pixelshuffle"),
    "HAT": lambda: builtin.HAT.HAT(img_size=16, embed_dim=12, depths=[1], num_heads=[1], window_size=4, upscale=2, upsampler="pixelshuffle", compress_ratio=3, squeeze_factor=3),
    "DRCT": lambda: builtin.DRCT.DRCT(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffle"),
    "ATD": lambda: builtin.ATD.ATD(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffle"),
    "DAT": lambda: builtin.DAT.DAT(img_size=16, embed_dim=12, depth=[1], num_heads=[2], split_size=[2, 4], upscale=2),
    "GRL": lambda: builtin.GRL.GRL(embed_dim=16, depths=[1], num_heads_window=[1], num_heads_stripe=[1], window_size=4, stripe_size=[4, 4], upscale=2),
    "OmniSR": lambda: builtin.OmniSR.OmniSR(num_feat=16, res_num=1, up_scale=2, window_size=4),
    "SAFMN": lambda: builtin.SAFMN.SAFMN(dim=8, n_blocks=1, upscaling_factor=2),
    "DITN": lambda: builtin.DITN.DITN(dim=12, ITL_blocks=1, SAL_blocks=1, upscale=2),
    "MoSR": lambda: builtin.MoSR.MoSR(dim=16, n_block=2, upscale=2),
    "MoESR": lambda: builtin.MoESR.MoESR(dim=16, n_blocks=1, n_block=1, scale=2),
    "SeemoRe": lambda: builtin.SeemoRe.SeemoRe(scale=2, embedding_dim=16, num_layers=1),
    "FDAT": lambda: builtin.FDAT.FDAT(scale=2, embed_dim=24, num_groups=1, depth_per_group=1, num_heads=2),
    "RCAN": lambda: builtin.RCAN.RCAN(n_resgroups=1, n_resblocks=1, n_feats=8, reduction=4, scale=2),
    "DCTLSA": lambda: builtin.DCTLSA.DCTLSA(in_nc=3, nf=12, num_modules=1, out_nc=3, upscale=2),
    "RealCUGAN": lambda: builtin.RealCUGAN.UpCunet2x(),
    "SCUNet": lambda: builtin.SCUNet.SCUNet(dim=16, config=[1] * 7),
    "NAFNet": lambda: builtin.NAFNet.NAFNet(width=8, enc_blk_nums=[1], dec_blk_nums=[1], middle_blk_num=1),
    "DnCNN": lambda: builtin.DnCNN.DnCNN(nb=3, nc=8),
    "DRUNet": lambda: builtin.DRUNet.DRUNet(nc=[8, 16, 32, 64], nb=1),
    "SRFormer": lambda: extra.SRFormer.SRFormer(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffle"),
    "Restormer": lambda: extra.Restormer.Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1]),
}


@pytest.mark.parametrize("name", OTHER_MODELS)
def test_esc_detection_claims_no_other_architecture(name) -> None:
    state = OTHER_MODELS[name]().state_dict()
    claimed = [s.architecture.id for s in ESC_REGISTRY if s.detect(state)]
    assert claimed == []


# -- spandrel's conventions: round trips, size requirements, snapshot -------------------------------

SMALL = dict(dim=16, pdim=8, n_blocks=2, conv_blocks=2, window_size=8, num_heads=2)
VARIANTS = {
    "ESC x2": lambda: esc_arch.esc(2, **SMALL),
    "ESC x3 LayerNorm": lambda: esc_arch.esc(3, use_ln=True, exp_ratio=2.0, **SMALL),
    "ESC x4 kernel 7": lambda: esc_arch.esc(4, **{**SMALL, "kernel_size": 7}),
    "ESCFP x2": lambda: esc_arch.esc_fp(2, **SMALL),
    "ESCFP x4": lambda: esc_arch.esc_fp(4, **{**SMALL, "n_blocks": 1}),
    "ESCReal nearest+conv": lambda: esc_arch.esc_real(4, **SMALL),
    "ESCReal dysample x2": lambda: esc_arch.esc_real(2, upsampler="dysample", **SMALL),
    "ESCReal neosr x2": lambda: esc_arch.esc_real(2, upsampler="nearest+conv-neosr", **SMALL),
    "ESCRealM conv x4": lambda: esc_arch.esc_realm(4, upsampler="conv", mid_dim=8, **SMALL),
    "ESCRealM pixelshuffledirect x3": lambda: esc_arch.esc_realm(3, upsampler="pixelshuffledirect", mid_dim=8, **SMALL),
    "ESCRealM pixelshuffle x2 unshuffle": lambda: esc_arch.esc_realm(2, upsampler="pixelshuffle", mid_dim=8, **SMALL),
    "ESCRealM nearest+conv x1 unshuffle": lambda: esc_arch.esc_realm(1, upsampler="nearest+conv", mid_dim=8, **SMALL),
    "ESCRealM dysample x4": lambda: esc_arch.esc_realm(4, upsampler="dysample", mid_dim=8, **SMALL),
    "ESCRealM transpose+conv x2": lambda: esc_arch.esc_realm(2, upsampler="transpose+conv", mid_dim=8, unshuffle_mod=False, **SMALL),
    "ESCLTE": lambda: esc_arch.esc_lte(**SMALL, hidden_dim=16, mlp_hidden=(16, 16)),
}


def _assert_same(model, loaded) -> None:
    assert type(loaded) is type(model)
    assert loaded.hyperparameters == model.hyperparameters
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_and_safetensors_round_trips_keep_every_hyperparameter(name) -> None:
    model = VARIANTS[name]()
    support = next(s for s in ESC_REGISTRY.architectures("detection") if s.detect(model.state_dict()))
    assert support.architecture.id == model.arch_name

    _assert_same(model, support.architecture.load(model.state_dict()).model)

    blob = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    _assert_same(model, MAIN_REGISTRY.load(safetensors.torch.load(blob)).model)


def _candidate_sizes(requirements: SizeRequirements, max_size: int = 33) -> list[int]:
    # around the window (8): below half, half, above; and past a full window
    sizes = {1, 2, 3, 4, 5, 8, 9, 17, max_size}
    return sorted(s for s in sizes if requirements.check(s, s) and s <= max_size)


@pytest.mark.parametrize("name", VARIANTS)
def test_size_requirements_hold_for_candidate_sizes(name) -> None:
    descriptor = MAIN_REGISTRY.load(VARIANTS[name]().state_dict())
    multiple = descriptor.size_requirements.multiple_of
    if descriptor.architecture.id != "ESCLTE":
        assert multiple == descriptor.model.window_size
    # the descriptor pads any size to the window (reflect), so every size works, multiples or not
    sizes = {1, 2, 7, multiple - 1, multiple + 1, *_candidate_sizes(descriptor.size_requirements)[:3]}
    for size in sorted(s for s in sizes if s >= 1):
        h, w = size, size + 3
        out = descriptor(torch.rand(1, 3, h, w))
        assert out.shape == (1, 3, h * descriptor.scale, w * descriptor.scale), (h, w)


def _fields(descriptor) -> dict:
    """What spandrel's snapshot tests record (everything but model, state_dict, device, dtype)."""
    return {
        "architecture": f"{type(descriptor.architecture).__name__}(id={descriptor.architecture.id}, name={descriptor.architecture.name})",
        "purpose": descriptor.purpose,
        "scale": descriptor.scale,
        "input_channels": descriptor.input_channels,
        "output_channels": descriptor.output_channels,
        "size_requirements": descriptor.size_requirements,
        "supports_half": descriptor.supports_half,
        "supports_bfloat16": descriptor.supports_bfloat16,
        "tags": descriptor.tags,
        "tiling": descriptor.tiling,
    }


def _snapshot(arch: str, purpose: str, scale: int, tags: list[str], low_precision: bool = True, multiple: int = 32) -> dict:
    return {
        "architecture": f"ESCArchitecture(id={arch}, name={arch})",
        "purpose": purpose,
        "scale": scale,
        "input_channels": 3,
        "output_channels": 3,
        # images are reflect-padded to the attention window (x the unshuffle factor): the paper's protocol
        "size_requirements": SizeRequirements(minimum=0, multiple_of=multiple, square=False),
        "supports_half": low_precision,
        "supports_bfloat16": low_precision,
        "tags": tags,
        "tiling": ModelTiling.SUPPORTED,
    }


REALM_SMALL = ["32dim", "1nb", "16w"]
SNAPSHOT = {
    "esc_x4": _snapshot("ESC", "SR", 4, ["64dim", "5nb", "32w"]),
    "esc_light_x2": _snapshot("ESC", "SR", 2, ["light", "64dim", "3nb", "32w"]),
    "esc_light_x3": _snapshot("ESC", "SR", 3, ["light", "64dim", "3nb", "32w"]),
    "esc_fp_x4": _snapshot("ESCFP", "SR", 4, ["48dim", "5nb", "32w"]),
    "esc_xl_shaped_x4": _snapshot("ESC", "SR", 4, ["48dim", "2nb", "48w", "LayerNorm"], multiple=48),
    "esc_real_x4": _snapshot("ESCReal", "SR", 4, ["64dim", "10nb", "32w", "nearest+conv"]),
    "esc_real_dysample_x4": _snapshot("ESCReal", "SR", 4, ["64dim", "10nb", "32w", "DySample"]),
    "escrealm_conv_x4": _snapshot("ESCRealM", "Restoration", 1, [*REALM_SMALL, "conv"], multiple=16),
    "escrealm_pixelshuffledirect_x4": _snapshot("ESCRealM", "SR", 4, [*REALM_SMALL, "pixelshuffledirect"], multiple=16),
    "escrealm_pixelshuffle_x4": _snapshot("ESCRealM", "SR", 4, [*REALM_SMALL, "pixelshuffle"], multiple=16),
    "escrealm_nearestconv_x4": _snapshot("ESCRealM", "SR", 4, [*REALM_SMALL, "nearest+conv"], multiple=16),
    "escrealm_dysample_x4": _snapshot("ESCRealM", "SR", 4, [*REALM_SMALL, "DySample"], multiple=16),
    "escrealm_pixelshuffle_x3": _snapshot("ESCRealM", "SR", 3, [*REALM_SMALL, "pixelshuffle"], multiple=16),
    "escrealm_nearestconv_x3": _snapshot("ESCRealM", "SR", 3, [*REALM_SMALL, "nearest+conv"], multiple=16),
    "escrealm_nearestconv_x2_unshuffle": _snapshot("ESCRealM", "SR", 2, [*REALM_SMALL, "nearest+conv", "2unshuffle"], multiple=16),
    "escrealm_nearestconv_x1_unshuffle": _snapshot("ESCRealM", "Restoration", 1, [*REALM_SMALL, "nearest+conv", "4unshuffle"], multiple=16),
    "lte_esc": _snapshot("ESCLTE", "SR", 4, ["64dim", "5nb", "32w", "LTE", "arbitrary-scale"], low_precision=False, multiple=1),
    "esc_x2_into_x4": _snapshot("ESC", "SR", 2, ["64dim", "5nb", "32w"]),  # the file holds x2 weights
    "esc_light_x4_converted": _snapshot("ESC", "SR", 4, ["light", "64dim", "3nb", "32w"]),
    "neosr_esc_real_nearestconv_x4": _snapshot("ESCReal", "SR", 4, ["64dim", "5nb", "32w", "nearest+conv(neosr)"]),
    "neosr_esc_real_dysample_x4": _snapshot("ESCReal", "SR", 4, ["64dim", "5nb", "32w", "DySample"]),
    "neosr_esc_classic_x4": _snapshot("ESC", "SR", 4, ["64dim", "5nb", "32w"]),
    "trainner_escrealm_x4": _snapshot("ESCRealM", "SR", 4, [*REALM_SMALL, "transpose+conv"], multiple=16),
    "trainner_escrealm_x4_pixelshuffle": _snapshot("ESCRealM", "SR", 4, [*REALM_SMALL, "pixelshuffle"], multiple=16),
    "trainner_escrealm_x2": _snapshot("ESCRealM", "SR", 2, [*REALM_SMALL, "transpose+conv"], multiple=16),
}


def test_snapshot_of_descriptor_fields_for_every_golden_checkpoint() -> None:
    assert set(SNAPSHOT) == set(CASES) - {DOWNSCALER}
    actual = {case_id: _fields(ModelLoader().load_from_file(_checkpoint(case_id))) for case_id in SNAPSHOT}
    assert actual == SNAPSHOT


def test_preset_tags_name_the_paper_configurations() -> None:
    xl = MAIN_REGISTRY.load(esc_arch.esc_xl(2).state_dict())
    tiny = MAIN_REGISTRY.load(esc_arch.esc_tiny(4).state_dict())
    assert (xl.tags, tiny.tags) == (["XL", "192dim", "8nb", "48w", "LayerNorm"], ["tiny", "32dim", "2nb", "16w"])


# -- registration ---------------------------------------------------------------------------------


def test_install_is_idempotent_and_adds_only_esc() -> None:
    registry = ArchRegistry()
    added = install(registry)
    assert [s.architecture.id for s in added] == [v.name for v in esc_arch.VARIANTS]  # the detection table
    assert install(registry) == []
    assert {s.architecture.id for s in registry} == ESC_IDS
    # chaiNNer then adds spandrel_extra_arches without ignore_duplicates: that must still work.
    registry.add(*EXTRA_REGISTRY)
    assert "SRFormer" in registry and "ESC" in registry


def test_main_registry_gets_esc_but_never_the_extra_architectures() -> None:
    assert install() == []  # the fixture installed already
    assert ESC_IDS <= {s.architecture.id for s in MAIN_REGISTRY}
    assert not any(s.architecture.id in MAIN_REGISTRY for s in EXTRA_REGISTRY)


def test_escrealm_is_tried_before_escreal() -> None:
    order = [s.architecture.id for s in ESC_REGISTRY.architectures("detection")]
    assert order.index("ESCRealM") < order.index("ESCReal")


def test_one_spandrel_architecture_per_row_of_the_detection_table() -> None:
    archs = [support.architecture for support in ESC_REGISTRY]
    assert all(isinstance(arch, esc_spandrel.ESCArchitecture) for arch in archs)
    assert [(arch.id, arch.name, arch.variant) for arch in archs] == [(v.name, v.name, v) for v in esc_arch.VARIANTS]
