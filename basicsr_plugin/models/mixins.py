"""Behaviour shared by the plugin's BasicSR models (combined with BasicSR's own model classes by inheritance).

* :class:`AtomicCheckpointMixin`: checkpoints and training states are written atomically, and under DDP every
  checkpoint first verifies that all ranks still hold identical weights.
* :class:`WindowPaddedTestMixin`: the official ESC test protocol (reflect-pad the LR to a multiple of the window,
  run the network, crop), on the EMA network when there is one.
* :class:`SafetensorsPretrainMixin`: ``path.pretrain_network_g`` may be a ``.safetensors`` file (an embedded model);
  with ``strict_load_g: false`` the tensors whose names match are loaded (a warm start of another head).
* :func:`fill_default_attention`: pick the attention back end when the option file does not name one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

import esc_arch
from esc_arch import pad_to_multiple  # reflect, right/bottom; repeated reflection for tiny inputs

from basicsr_plugin.attention import default_attention_backend
from basicsr_plugin.checkpoint_io import atomic_torch_save

def _device_type(opt: dict) -> str:
    return "cuda" if opt.get("num_gpu", 0) != 0 and torch.cuda.is_available() else "cpu"


def fill_default_attention(opt: dict, key: str = "network_g") -> bool:
    """Set ``opt[key]['attn_type']`` to the fastest correct back end if the YAML leaves it out; True if it did.

    The trained network gets the best training back end; :func:`use_inference_attention` later switches the EMA copy
    (which only ever runs inference) to the best inference back end.
    """
    net_opt = opt.get(key)
    if not net_opt or net_opt.get("type") not in esc_arch.ARCHITECTURES or net_opt.get("attn_type"):
        return False
    device = _device_type(opt)
    net_opt["attn_type"] = default_attention_backend(device, training=bool(opt.get("is_train")))
    get_root_logger().info(f"{key}.attn_type not set: using '{net_opt['attn_type']}' (fastest correct on {device})")
    return True


def use_inference_attention(model, defaulted: bool) -> None:
    """After building: give the EMA network the fastest inference back end (only when the YAML chose none)."""
    if defaulted and hasattr(model, "net_g_ema"):
        backend = default_attention_backend(_device_type(model.opt), training=False)
        model.net_g_ema.set_attention_backend(backend)
        get_root_logger().info(f"net_g_ema (inference only) uses attn_type '{backend}'")


class WindowPaddedTestMixin:
    """``test()`` as in the official ESRModel: pad to the window, run the bare (EMA) network, crop to h*s x w*s."""

    def _test_network(self) -> torch.nn.Module:
        return self.get_bare_model(self.net_g_ema if hasattr(self, "net_g_ema") else self.net_g)

    def test(self) -> None:
        net = self._test_network()
        multiple = int(getattr(net, "window_size", None) or self.opt.get("network_g", {}).get("window_size", 1))
        scale = int(getattr(net, "scale", None) or self.opt["scale"])
        h, w = self.lq.shape[-2:]
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = net(pad_to_multiple(self.lq, multiple))[..., : h * scale, : w * scale]
        net.train(was_training)


class SafetensorsPretrainMixin:
    """Read ``.safetensors`` pretrained weights through ``esc_arch`` (other files go to BasicSR's loader)."""

    def load_network(self, net, load_path, strict=True, param_key="params"):
        if not str(load_path).endswith(".safetensors"):
            return super().load_network(net, load_path, strict, param_key)
        result = self.get_bare_model(net).load_state_dict(esc_arch.read_state_dict(load_path), strict=strict)
        if not strict:
            get_root_logger().info(
                f"Loaded {load_path} non-strictly: {len(result.missing_keys)} tensors of the network kept their "
                f"initialisation, {len(result.unexpected_keys)} of the file were not used")


class AtomicCheckpointMixin:
    """Atomic ``save_network`` / ``save_training_state`` and a DDP replica-consistency check at every save."""

    @master_only
    def save_network(self, net, net_label, current_iter, param_key="params"):
        label = "latest" if current_iter == -1 else current_iter
        save_path = os.path.join(self.opt["path"]["models"], f"{net_label}_{label}.pth")
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f"{len(nets)} networks but {len(keys)} parameter keys")
        payload = {}
        for net_, key in zip(nets, keys):
            state = self.get_bare_model(net_).state_dict()
            payload[key] = {k.removeprefix("module."): v.detach().cpu() for k, v in state.items()}
        atomic_torch_save(payload, save_path)

    @master_only
    def save_training_state(self, epoch, current_iter):
        if current_iter == -1:
            return
        state = {
            "epoch": epoch,
            "iter": current_iter,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }
        atomic_torch_save(state, os.path.join(self.opt["path"]["training_states"], f"{current_iter}.state"))

    def save(self, epoch, current_iter):
        self.check_replicas_in_sync(current_iter)
        super().save(epoch, current_iter)

    def _networks_to_check(self) -> list[torch.nn.Module]:
        nets = [self.net_g] + ([self.net_g_ema] if hasattr(self, "net_g_ema") else [])
        if hasattr(self, "net_d"):
            nets.append(self.net_d)
        return [self.get_bare_model(n) for n in nets]

    def check_replicas_in_sync(self, current_iter) -> float:
        """Under DDP, compare every rank's weights (and EMA weights); raise if any rank drifted.

        DDP keeps replicas identical by all-reducing gradients; a rank that drifts (a non-deterministic op applied
        to parameters, a buffer updated on one rank only) would silently make the saved rank-0 checkpoint
        unrepresentative. Returns the largest absolute difference found (0.0 without DDP).
        """
        if not (self.opt.get("dist") and dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return 0.0
        flat = torch.cat([p.detach().reshape(-1).double() for n in self._networks_to_check() for p in n.state_dict().values()
                          if p.is_floating_point()])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        max_diff = float((high - low).abs().max()) if flat.numel() else 0.0
        label = "end" if current_iter == -1 else f"iter {current_iter}"
        if self.opt.get("rank", 0) == 0:
            get_root_logger().info(
                f"Replica check at {label}: {dist.get_world_size()} ranks, {flat.numel()} values, "
                f"max |difference| = {max_diff:.3g}")
        if max_diff > float(self.opt.get("train", {}).get("replica_tolerance", 0.0)):
            raise RuntimeError(f"DDP replicas diverged at {label}: max |weight difference| between ranks = {max_diff:.3g}")
        return max_diff
