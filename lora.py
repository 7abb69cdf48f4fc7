"""LoRA adapters for prost: one frozen base model, one small adapter per agent role.

ProST fine-tunes a planner, an executor and a critic. Instead of three full models, prost keeps one frozen
base (`model.Transformer`) and gives each role a LoRA adapter: a low-rank update to the attention and MLP
projections,

    y = W x + b + (alpha / r) * B (A (dropout(x)))        A: (r, in), B: (out, r)

A starts kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged. Several named
adapters live side by side on the same base weights; `set_adapter(model, "planner")` before a role's
forward pass selects one (switching only changes a name, never copies weights), and
`set_adapter(model, None)` gives the plain base model.

Where this file sits: `prost.py` calls `apply_lora` (adds an adapter and makes it the only trainable
thing) and `save_adapter`; the agents' engines rebuild a system with `merged_copy` per role (the adapter
folded into copies of the layers it covers, so inference runs only the base's matmuls) and `adapter_base`
to find the base model. Adapters are stored in PEFT's on-disk layout, so a prost adapter can be used by
PEFT / transformers / vLLM and a PEFT adapter can be used by prost. Beside it: dropout_masks.py (a faster
dropout with the same distribution), decoding.py (a batch whose rows each run their own adapter) and
model_io.py (`python model_io.py merge ADAPTER OUT`: an adapter folded into a plain Hugging Face folder).
It imports no other prost file but two leaves: adapter_checks.py (every check on an adapter folder it reads)
and store.py (atomic file writes).

Dtype rule: adapter weights are created in fp32 (they are small, and the optimizer's small updates would
be rounded away in bf16). The base may be bf16 or fp32. Outside autocast the adapter path casts its input
to the adapter dtype; under autocast its matmuls run in the autocast dtype like the base's. Its result is
added into the base output in that output's dtype (inside the last matmul when the dtypes agree).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import adapter_checks
from store import atomic_write

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT wraps the causal LM twice (PeftModel.base_model = LoraModel, LoraModel.model = the LM), so every
# saved key starts with this prefix followed by the module path inside the LM.
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter (shared by every layer it is applied to)."""

    r: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate(self) -> None:
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")


def textbook_drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(x with each element zeroed with probability p, the keep probability 1 - p): inverted dropout, whose
    1 / (1 - p) rescaling the caller applies to the narrow tensor after A (dropout_masks.drop: the same, faster)."""
    return x * (torch.rand(x.shape, device=x.device) >= p).to(x.dtype), 1 - p


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus any number of named low-rank adapters, at most one active.

    The base `weight` / `bias` Parameters are adopted as they are (same objects, no copy) and registered
    under the same names, so the base keys of a wrapped model stay the Hugging Face checkpoint keys
    (`<path>.weight`, `<path>.bias`, not `<path>.base_layer.weight`); adapter tensors add keys
    `<path>.lora_A.<name>` / `<path>.lora_B.<name>` next to them.
    """

    drop = staticmethod(textbook_drop)  # the dropout on the adapter input (dropout_masks.use_fast_dropout swaps it)

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # (out, in), base dtype
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias  # (out,)
        self.lora_A = nn.ParameterDict()  # name -> (r, in) fp32
        self.lora_B = nn.ParameterDict()  # name -> (out, r) fp32
        self.specs: dict[str, AdapterSpec] = {}
        self.active: str | None = None
        self.merged: str | None = None  # name of the adapter currently folded into `weight`

    def add(self, name: str, spec: AdapterSpec) -> None:
        device = self.weight.device
        a = torch.empty(spec.r, self.in_features, dtype=torch.float32, device=device)
        # Same init as nn.Linear's weight: the adapter's first matmul starts like a default linear layer.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, spec.r, dtype=torch.float32, device=device)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = spec

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update this adapter adds to `weight`: scale * B @ A, (out, in) fp32."""
        return self.specs[name].scale * (self.lora_B[name] @ self.lora_A[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = F.linear(x, self.weight, self.bias)  # (..., out), base dtype
        if self.active is None or self.merged is not None:
            return y
        return self.add_update(x, y, self.active)

    def add_update(self, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        """y += adapter `name`'s update of x, in place; returns y."""
        a, b, spec = self.lora_A[name], self.lora_B[name], self.specs[name]
        # Under autocast the matmuls below run in the autocast dtype whatever their inputs: a cast of the
        # (..., in) input to fp32 first would be two wasted full-width copies.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)  # (..., in)
        scale = spec.scale
        if self.training and spec.dropout > 0:
            h, keep = self.drop(h, spec.dropout)
            scale = scale / keep  # inverted dropout's rescaling, on the narrow tensor below
        u = F.linear(h, a) * scale  # (..., r): scale the narrow tensor, not the wide output
        # Add B u into y in place: y is not needed by autograd (linear saves its input, not its output), and a
        # full-width temporary costs as much memory traffic as the low-rank matmuls themselves.
        if u.dtype == y.dtype:  # autocast or an fp32 base: the sum happens inside the matmul, rounded once
            y.view(-1, self.out_features).addmm_(u.view(-1, spec.r), b.t().to(y.dtype))
        else:  # a bf16 base outside autocast: the adapter's matmuls stay fp32, rounded once into y
            y.add_(F.linear(u, b).to(y.dtype))
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        # Add in fp32, round once to the base dtype.
        self.weight.copy_((self.weight.float() + self.delta_weight(self.active)).to(self.weight.dtype))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight(self.merged)).to(self.weight.dtype))
        self.merged = None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}, alpha={s.alpha})" for n, s in self.specs.items())
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"adapters=[{adapters}], active={self.active}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------
# Finding and wrapping layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer of the model, by module path (e.g. `model.layers.0.self_attn.q_proj`)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of one adapter (what the training loop hands to the optimizer)."""
    _check_exists(model, name)
    params = []
    for layer in lora_layers(model).values():
        if name in layer.specs:
            params += [layer.lora_A[name], layer.lora_B[name]]
    return params


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of one decoder layer, by module name."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def count_adapter_parameters(config, r: int, targets: Iterable[str] = DEFAULT_TARGETS) -> int:
    """Parameters of one adapter, computed from the config: r * (in + out) per wrapped projection."""
    shapes = projection_shapes(config)
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return config.num_hidden_layers * per_layer


def _target_paths(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Module paths of the linear layers whose last name component is one of `targets`."""
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoRA targets are empty; pass module names such as ('q_proj', 'v_proj')")
    if "lm_head" in targets:
        raise ValueError("LoRA on lm_head is not supported (in tied models it is the embedding matrix); "
                         "target the projections only")
    linear_names = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, LoRALinear)):
            linear_names[path] = path.rsplit(".", 1)[-1]
    missing = sorted(set(targets) - set(linear_names.values()))
    if missing:
        available = sorted(set(linear_names.values()) - {"lm_head"})
        raise ValueError(f"LoRA targets {missing} match no linear layer; available: {available}")
    return [path for path, short in linear_names.items() if short in targets]


def _wrap(model: nn.Module, path: str) -> LoRALinear:
    """Replace the nn.Linear at `path` by a LoRALinear around it (idempotent)."""
    module = model.get_submodule(path)
    if isinstance(module, LoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise ValueError(f"module '{path}' is a {type(module).__name__}, LoRA wraps only nn.Linear")
    parent_path, _, child = path.rpartition(".")
    wrapped = LoRALinear(module)
    setattr(model.get_submodule(parent_path), child, wrapped)
    return wrapped


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' (e.g. 'planner')")


def _check_exists(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r} on the model; adapters: {adapter_names(model)}")


def _add_at_paths(model: nn.Module, name: str, spec: AdapterSpec, paths: list[str]) -> None:
    _check_name(name)
    spec.validate()
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists on the model; pick another name")
    for path in paths:
        _wrap(model, path).add(name, spec)


# ----------------------------------------------------------------------------------------------------
# The public adapter API


def add_adapter(model: nn.Module, name: str, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                targets: Iterable[str] = DEFAULT_TARGETS) -> None:
    """Add a fresh adapter `name` on every linear layer named in `targets` (does not activate it)."""
    _add_at_paths(model, name, AdapterSpec(r, alpha, dropout), _target_paths(model, targets))


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS, name: str = "default") -> nn.Module:
    """Prepare a model for LoRA training: freeze everything, add adapter `name`, make it active.

    Afterwards the new adapter's A and B are the only parameters with requires_grad=True (adapters
    added earlier are frozen too), so `[p for p in model.parameters() if p.requires_grad]` is exactly
    what to train. Returns the model (modified in place).
    """
    model.requires_grad_(False)
    add_adapter(model, name, r, alpha, dropout, targets)
    set_adapter(model, name)
    return model


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the active one on every layer it covers; None disables all adapters."""
    layers = lora_layers(model)
    merged = {layer.merged for layer in layers.values()} - {None}
    if merged == {name}:
        return  # already merged into the weights, so already in effect
    if merged:
        raise ValueError(f"adapter {merged.pop()!r} is merged into the weights; call unmerge(model) before "
                         f"switching adapters")
    if name is not None:
        _check_exists(model, name)
    for layer in layers.values():
        layer.active = name if name in layer.specs else None


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when the model runs as the plain base."""
    active = {layer.active for layer in lora_layers(model).values()} - {None}
    return active.pop() if active else None


def merge(model: nn.Module) -> None:
    """Fold the active adapter into the base weights (forward then skips the adapter path).

    Exact up to fp32 rounding on an fp32 base; on a bf16 base merged weights are rounded to bf16.
    """
    if active_adapter(model) is None:
        raise ValueError("no active adapter to merge; call set_adapter(model, name) first")
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Subtract a merged adapter from the base weights again (a no-op when nothing is merged).

    On a bf16 base the restored weights can differ from the originals by one bf16 rounding step.
    """
    for layer in lora_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (HF keys, no adapter tensors) with the active adapter folded in."""
    layers = lora_layers(model)
    state = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    for path, layer in layers.items():
        if layer.active is not None and layer.merged is None:
            w = layer.weight.detach()
            state[f"{path}.weight"] = (w.float() + layer.delta_weight(layer.active)).to(w.dtype)
    return state


@torch.no_grad()
def merged_copy(model: nn.Module, in_dir: str | os.PathLike, name: str) -> nn.Module:
    """A copy of `model` (a base without adapters) that runs the adapter in `in_dir` merged into its weights.

    For inference with several roles on one base: each role's forward then runs exactly the base's matmuls,
    where an unmerged adapter adds two narrow matmuls and their glue to every wrapped layer. Only the weights
    the adapter changes are new tensors (merged in fp32, rounded once to the base dtype); every other
    parameter (embeddings, norms, layers the adapter does not cover) is shared with `model`, not copied.
    """
    if lora_layers(model):
        raise ValueError("merged_copy needs a base model without adapters")
    merged = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})  # new modules, shared tensors
    load_adapter(merged, in_dir, name)
    set_adapter(merged, name)
    for layer in lora_layers(merged).values():
        w = layer.weight
        layer.weight = nn.Parameter((w.float() + layer.delta_weight(name)).to(w.dtype), requires_grad=False)
        layer.merged = name
    return merged.eval()


# ----------------------------------------------------------------------------------------------------
# PEFT-format files


def _peft_config(spec: AdapterSpec, targets: list[str], base: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, name: str) -> Path:
    """Write adapter `name` as a PEFT LoRA folder: adapter_config.json + adapter_model.safetensors."""
    _check_exists(model, name)
    out_dir = Path(out_dir)
    layers = {path: m for path, m in lora_layers(model).items() if name in m.specs}
    spec = next(iter(layers.values())).specs[name]
    tensors = {}
    for path, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].detach().cpu().contiguous()
    targets = sorted({path.rsplit(".", 1)[-1] for path in layers})
    config = _peft_config(spec, targets, getattr(model, "name_or_path", None) or None)
    # Weights first, config last: a folder whose config is readable has the weights that go with it.
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out_dir / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out_dir


def adapter_base(in_dir: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on (`base_model_name_or_path`)."""
    base = adapter_checks.read_adapter_config(Path(in_dir) / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(in_dir) / ADAPTER_CONFIG} records no base_model_name_or_path")
    return base


def load_adapter(model: nn.Module, in_dir: str | os.PathLike, name: str, check_base: bool = True) -> None:
    """Load a PEFT LoRA folder into the model as adapter `name` (does not activate it).

    If the model has no adapter `name` yet, one is created on exactly the modules the file covers. If it
    has one (e.g. resuming training after `apply_lora`), the weights are copied into it in place, so an
    optimizer holding those parameters stays valid; its rank, alpha and modules must match the file.
    With check_base, the base recorded in the folder must be the base the model was loaded from.
    """
    in_dir = Path(in_dir)
    config = adapter_checks.read_adapter_config(in_dir / ADAPTER_CONFIG)
    recorded, ours = config.get("base_model_name_or_path"), getattr(model, "name_or_path", None)
    if check_base and recorded and ours and not adapter_checks.same_base(recorded, ours):
        raise ValueError(f"{in_dir} is an adapter for base '{recorded}' but the model is '{ours}'; "
                         f"load that base, or pass check_base=False if they are the same weights")
    spec = AdapterSpec(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)))
    pairs = adapter_checks.read_adapter_tensors(in_dir / ADAPTER_WEIGHTS, spec.r)
    adapter_checks.check_shapes(model, pairs, in_dir, (nn.Linear, LoRALinear))

    if name in adapter_names(model):
        existing = {path: m.specs[name] for path, m in lora_layers(model).items() if name in m.specs}
        adapter_checks.check_matches_existing(existing, name, spec, set(pairs), in_dir)
    else:
        _add_at_paths(model, name, spec, sorted(pairs))
    layers = lora_layers(model)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            layers[module].lora_A[name].copy_(a)
            layers[module].lora_B[name].copy_(b)
