"""The model zoo the benchmarks compare: ESC-SR's own ×4 models on each attention backend, and the
peers that spandrel 0.4.2 implements, built from their constructors with random weights.

Random weights are fine for speed and memory: neither depends on the values.  The peers use the
official "light" configurations of their papers / training option files (the ones whose numbers the
ESC paper's Table 2 quotes), so their cost is the cost a user of those checkpoints pays.

``PAPER_X4`` holds the ESC paper's Table 2 (×4, DIV2K-trained) numbers: GPU latency and memory for a
1280×720 output, and Urban100 PSNR, which the teaser-style plot puts on its y axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from esc_sr.facts import ATTENTION_BACKENDS as ESC_BACKENDS

SCALE = 4


@dataclass(frozen=True)
class PaperNumbers:
    """One row of the ESC paper's Table 2 at ×4 (GPU, fp32, 320×180 input)."""

    latency_ms: float
    memory_mb: float
    gflops: float
    params_k: float
    urban100_psnr: float


# Table 2 of arXiv 2503.06671 (×4 block), transcribed in shared/spec/esc_architecture.md §4.1.
PAPER_X4: dict[str, PaperNumbers] = {
    "SwinIR-light": PaperNumbers(222.9, 351, 63.6, 930, 26.47),
    "OmniSR": PaperNumbers(22.5, 273, 50.9, 792, 26.64),
    "ATD-light": PaperNumbers(189.7, 753, 100.1, 769, 26.97),
    "RCAN": PaperNumbers(52.2, 540, 917.6, 15592, 26.82),
    "ESC-FP": PaperNumbers(21.7, 158, 60.8, 539, 26.90),
    "ESC-light": PaperNumbers(13.3, 213, 91.0, 624, 26.76),
    "ESC": PaperNumbers(21.9, 215, 149.2, 968, 27.07),
}


@dataclass(frozen=True)
class ModelEntry:
    """One benchmark row: how to build the model and what it is."""

    name: str  # the model, e.g. 'ESC' or 'SwinIR-light'
    family: str  # 'ours' or 'peer'
    build: Callable[[], nn.Module] = field(repr=False)
    source: str  # where the architecture comes from and with which configuration
    backend: str | None = None  # attention backend (ours only)
    default_backend: bool = False  # the path a user gets without choosing
    multiple_of: int = 1  # input sides must be a multiple of this (padded by the harness)
    heavy: bool = False  # too slow for the CPU budget; measured only with --all-models or on CUDA

    @property
    def key(self) -> str:
        """Unique row id: 'ESC[sdpa]' for ours, the model name for peers."""
        return f"{self.name}[{self.backend}]" if self.backend else self.name

    @property
    def paper(self) -> PaperNumbers | None:
        return PAPER_X4.get(self.name)


# ------------------------------------------------------------------------------------------------ ours
def _esc_builder(preset: str, backend: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import esc_arch

        model = esc_arch.PRESETS[preset](SCALE)
        esc_arch.set_attention_backend(model, backend)
        return model

    return build


def default_esc_backend() -> str:
    """The attention backend a freshly built ESC uses (what a user gets without choosing)."""
    import esc_arch

    return str(esc_arch.esc(SCALE).attn_type)


def _our_entries() -> list[ModelEntry]:
    try:
        default = default_esc_backend()
    except Exception:  # esc_arch missing or broken: the peers can still be measured
        return []
    entries = []
    for name, preset in (("ESC", "esc"), ("ESC-light", "esc_light"), ("ESC-FP", "esc_fp")):
        for backend in ESC_BACKENDS:
            entries.append(
                ModelEntry(
                    name=name,
                    family="ours",
                    build=_esc_builder(preset, backend),
                    source=f"esc_arch.{preset}({SCALE}), attention '{backend}'",
                    backend=backend,
                    default_backend=backend == default,
                )
            )
    return entries


# ------------------------------------------------------------------------------------------------ peers
def import_spandrel_architectures():
    """Import ``spandrel.architectures`` after making torchvision importable next to CPU torch."""
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import spandrel.architectures as architectures

    return architectures


def _peer(name: str, arch: str, kwargs: dict[str, Any], config: str, **extra: Any) -> ModelEntry:
    def build() -> nn.Module:
        module = getattr(import_spandrel_architectures(), arch)
        return getattr(module, arch)(**kwargs)

    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return ModelEntry(name=name, family="peer", build=build, source=f"spandrel 0.4.2 {arch}({args}); {config}", **extra)


def _peer_entries() -> list[ModelEntry]:
    return [
        _peer(
            "SwinIR-light", "SwinIR",
            dict(img_size=64, embed_dim=60, depths=[6, 6, 6, 6], num_heads=[6, 6, 6, 6], window_size=8,
                 mlp_ratio=2.0, upscale=SCALE, upsampler="pixelshuffledirect", resi_connection="1conv"),
            "SwinIR lightweight x4 config",
        ),
        _peer(
            "OmniSR", "OmniSR",
            dict(num_feat=64, block_num=1, pe=True, window_size=8, res_num=5, up_scale=SCALE, bias=True),
            "Omni-SR x4 config",
        ),
        _peer(
            "ATD-light", "ATD",
            dict(img_size=64, embed_dim=48, depths=[6, 6, 6, 6], num_heads=[4, 4, 4, 4], window_size=16,
                 category_size=128, num_tokens=64, reducted_dim=8, convffn_kernel_size=7, mlp_ratio=1.0,
                 upscale=SCALE, upsampler="pixelshuffledirect"),
            "ATD-light x4 config (as in the ESC repo's ATD_light test options)",
        ),
        _peer(
            "DAT-light", "DAT",
            dict(img_size=64, embed_dim=60, split_size=[8, 32], depth=[18], num_heads=[6], expansion_factor=2.0,
                 upscale=SCALE, upsampler="pixelshuffledirect", resi_connection="3conv"),
            "DAT-light x4 config",
        ),
        _peer(
            "SPAN", "SPAN",
            dict(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=SCALE),
            "SPAN 48-channel x4 (training-time Conv3XC branches, as spandrel builds it)",
        ),
        _peer(
            "SAFMN", "SAFMN",
            dict(dim=36, n_blocks=8, ffn_scale=2.0, upscaling_factor=SCALE),
            "SAFMN x4 config", multiple_of=8,
        ),
        _peer(
            "PLKSR", "PLKSR",
            dict(dim=64, n_blocks=28, upscaling_factor=SCALE, ccm_type="CCM", kernel_size=17, split_ratio=0.25,
                 lk_type="PLK", use_ea=True),
            "PLKSR x4 config (spandrel defaults)",
        ),
        _peer(
            "RCAN", "RCAN",
            dict(scale=SCALE, n_resgroups=10, n_resblocks=20, n_feats=64),
            "RCAN x4 config", heavy=True,
        ),
    ]


def model_zoo() -> list[ModelEntry]:
    """Every row of the model table: ours (each preset x each backend) then the peers."""
    return _our_entries() + _peer_entries()


def find_entry(key: str) -> ModelEntry:
    """Look a row up by its key ('ESC[sdpa]', 'SwinIR-light')."""
    for entry in model_zoo():
        if entry.key == key:
            return entry
    known = ", ".join(e.key for e in model_zoo())
    raise KeyError(f"unknown benchmark model {key!r}; known: {known}")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, as the paper counts them (``requires_grad`` only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare(entry: ModelEntry, device: torch.device) -> nn.Module:
    """Build, switch to eval, move to ``device`` (fp32, like the paper's protocol)."""
    return entry.build().eval().to(device=device, dtype=torch.float32)


def padded_size(entry: ModelEntry, size: tuple[int, int]) -> tuple[int, int]:
    """The input size actually fed to the model: sides rounded up to ``entry.multiple_of``."""
    m = entry.multiple_of
    return (-(-size[0] // m) * m, -(-size[1] // m) * m)
