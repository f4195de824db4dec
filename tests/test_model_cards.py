"""Model metadata where users look for it (issue 27, item 4): ``esc-sr info``, the spandrel descriptors and the
OpenModelDB entries say the variant, scale, parameters, training data and licence of the embedded and official
models (``esc_sr.cards``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import esc_arch
from esc_sr import cards, cli, hub

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = REPO_ROOT.parent / "shared" / "fixtures" / "golden"


def _info(argv, capsys) -> str:
    assert cli.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(esc_arch.EMBEDDED_MODELS))
def test_every_embedded_model_has_a_card_that_matches_the_shipped_file(name):
    card = cards.EMBEDDED_CARDS[name]
    model = esc_arch.load_model(name)
    assert card.scale == model.scale
    assert card.parameters == esc_arch.count_parameters(model)
    assert card.variant.startswith(model.arch_name + " ")
    assert card.license == "MIT" and card.training_data and card.degradation
    assert (REPO_ROOT / card.card).is_file()
    assert cards.identify(model.state_dict()) is card  # fp32 copy of the fp16 file: still recognised


@pytest.mark.parametrize("name", sorted(esc_arch.EMBEDDED_MODELS))
def test_info_says_training_data_and_licence_of_the_embedded_models(name, capsys):
    out = _info(["info", name], capsys)
    card = cards.EMBEDDED_CARDS[name]
    assert f"published as:     {name} (" in out
    assert f"training data:    {card.training_data}" in out
    assert "licence:          MIT" in out and f"parameters:       {card.parameters:,}" in out
    facts = json.loads(_info(["info", name, "--json"], capsys))
    assert facts["card"]["training_data"] == card.training_data and facts["card"]["scale"] == 4
    if name == "real":
        assert "status:           in training" in out


def test_info_recognises_a_copy_of_an_embedded_model_by_its_weights(tmp_path, capsys):
    copy = tmp_path / "my_upscaler.safetensors"
    shutil.copy(esc_arch.EMBEDDED_MODELS["real"], copy)
    assert "published as:     real (ESCRealM" in _info(["info", copy], capsys)


def test_info_says_what_it_does_not_know(capsys):
    out = _info(["info", GOLDEN / "esc_light_x2.ckpt.pth"], capsys)
    assert "published as:     not a known published model" in out


def test_every_official_release_name_has_a_card():
    for name, asset in hub.REGISTRY.items():
        card = cards.card_for_name(name)
        assert card is not None, name
        assert card.name == name and card.scale == asset.scale and card.license == "MIT"
        assert card.source == f"{cards.OFFICIAL_RELEASE}/{name}.pth"
        assert cards.card_for_name(f"/downloads/{name.lower()}.pth") == card  # as a file name too
    assert cards.card_for_name("ESC_DFLIP_X3").training_data.startswith("DFLIP (DIV2K + Flickr2K + LSDIR")
    assert cards.card_for_name("ESC_DIV2K_X5") is None and cards.card_for_name("photo.png") is None


def test_info_of_an_official_name_says_its_training_data(monkeypatch, capsys, tmp_path):
    """The official file is named by its release name (no download here: the name resolves to a local copy)."""
    local = tmp_path / "ESC_light_X2.pth"
    shutil.copy(GOLDEN / "esc_light_x2.ckpt.pth", local)
    out = _info(["info", local], capsys)
    assert "published as:     ESC_light_X2 (ESC (esc_light), x2)" in out
    assert "training data:    DIV2K (800 images)" in out and "licence:          MIT" in out


def test_spandrel_descriptors_carry_the_card_of_embedded_models():
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import spandrel

    import esc_arch.spandrel as esc_spandrel

    esc_spandrel.install()
    cards.attach_to_spandrel()  # as the ComfyUI pack does
    for name, path in esc_arch.EMBEDDED_MODELS.items():
        descriptor = spandrel.ModelLoader().load_from_file(str(path))
        assert descriptor.esc_model_card is cards.EMBEDDED_CARDS[name]
        assert esc_spandrel.describe(esc_arch.load_model(name)).esc_model_card is cards.EMBEDDED_CARDS[name]
    other = spandrel.ModelLoader().load_from_file(str(GOLDEN / "esc_x4.ckpt.pth"))
    assert other.esc_model_card is None


def test_openmodeldb_entries_are_current_and_complete():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "openmodeldb.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    required = {"name", "author", "license", "tags", "description", "date", "architecture", "size", "scale",
                "inputChannels", "outputChannels", "resources", "images"}
    files = sorted((REPO_ROOT / "docs" / "openmodeldb").glob("*.json"))
    assert len(files) == len(esc_arch.EMBEDDED_MODELS)
    for file in files:
        entry = json.loads(file.read_text())
        assert required <= set(entry), file.name
        assert file.stem.startswith(f"{entry['scale']}x-")  # OpenModelDB ids start with the scale
        (resource,) = entry["resources"]
        assert resource["platform"] == "pytorch" and resource["type"] == "safetensors"
        assert len(resource["sha256"]) == 64 and resource["sha256"] == resource["sha256"].lower()
