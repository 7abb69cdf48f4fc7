"""adapter_checks.py: every check on a PEFT LoRA adapter folder before lora.py loads it into a model.

A bad adapter should fail where it is read, naming the file and what is wrong, rather than as a shape error deep
in a forward pass or (NaN weights, a rank-stabilised or DoRA adapter read as plain LoRA) as silently wrong
outputs. lora.load_adapter calls these on adapter_config.json and adapter_model.safetensors; run_folder.py checks
a training state's adapter tensors with `check_finite`. A leaf: it imports no prost file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

# a saved key: lora.PEFT_PREFIX, the module path inside the LM, then the A or B half
PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<AB>[AB])\.weight$")


def read_adapter_config(path: Path) -> dict:
    """Parse and sanity-check `path`, the adapter_config.json of a PEFT LoRA folder."""
    in_dir = path.parent
    if not in_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {in_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{in_dir} has no {path.name}; is it a PEFT LoRA adapter folder?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{path}: peft_type must be 'LORA', got {got!r}")
    unsupported = {
        "bias": config.get("bias", "none") != "none",
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{path}: prost supports plain LoRA only; unsupported settings: {bad}")
    return config


def same_base(a: str, b: str) -> bool:
    """Whether two model references name the same base (identical ids, or paths to one folder)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def read_adapter_tensors(path: Path, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A (r, in), B (out, r))} from `path`, the adapter_model.safetensors of a PEFT LoRA folder,
    keys, pairs, rank and values checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name} (prost reads safetensors adapters only)")
    try:
        raw = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    check_finite(raw, str(path))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected key {key!r} (expected base_model.model.<module>.lora_A/B.weight)")
        halves.setdefault(m["path"], {})[m["AB"]] = tensor
    pairs = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {module} has lora_{''.join(ab)} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{path}: {module} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, "
                             f"but adapter_config.json says r={r} (wrong rank)")
        pairs[module] = (a, b)
    if not pairs:
        raise ValueError(f"{path} holds no LoRA tensors")
    return pairs


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf (a diverged or corrupted run): loaded, they would silently turn
    every output of the role into garbage."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: tensor {key} holds {bad} non-finite value(s) (NaN or inf); this adapter "
                             "is unusable: retrain it or resume from an earlier checkpoint")


def check_shapes(model: nn.Module, pairs: dict, in_dir: Path, linear_types: tuple[type, ...]) -> None:
    """Each (A, B) pair of `pairs` must target a linear layer (one of `linear_types`) of the model's shape."""
    for module, (a, b) in pairs.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"{in_dir}: adapter targets {module}, which this model does not have "
                             f"(wrong base model?)") from None
        if not isinstance(layer, linear_types):
            raise ValueError(f"{in_dir}: adapter targets {module}, which is not a linear layer")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise ValueError(f"{in_dir}: {module} is {layer.in_features}->{layer.out_features} in this model "
                             f"but {a.shape[1]}->{b.shape[0]} in the adapter (wrong base model?)")


def check_matches_existing(existing: dict, name: str, spec, modules: set[str], in_dir: Path) -> None:
    """Loading into adapter `name` already on the model (module path -> its lora.AdapterSpec in `existing`)
    needs the same rank, alpha and modules as the file's (`spec`, `modules`)."""
    have = next(iter(existing.values()))
    if (have.r, have.alpha) != (spec.r, spec.alpha):
        raise ValueError(f"{in_dir} has r={spec.r}, alpha={spec.alpha} but adapter {name!r} on the model "
                         f"has r={have.r}, alpha={have.alpha} (wrong rank)")
    if set(existing) != modules:
        raise ValueError(f"{in_dir} covers {len(modules)} modules but adapter {name!r} on the model covers "
                         f"{len(existing)}; the target modules differ")
