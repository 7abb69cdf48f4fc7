"""checkpoint_checks.py: the checks that a checkpoint's tensors fill a model exactly, before they become its
parameters.

A bad checkpoint should fail where it is read, naming the tensor and the file, rather than as a shape error deep in
the model or (a missing shard, a tensor left at its meta placeholder) as a half-loaded network. model.py's
safetensors loading and model_io.py's GGUF loading call these: `checkpoint_files` finds the file holding each
tensor of a single-file or sharded safetensors checkpoint, `expected_tensors` compares the names a checkpoint
holds with the model's parameters, and `set_parameter` checks one tensor's shape as it becomes a parameter. A
leaf: it imports no prost file.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, for a single-file or sharded checkpoint."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: folder / f for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index} is missing; re-download the checkpoint")
        return files
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder} "
                            "(only safetensors checkpoints are supported)")


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt: {e}); "
                         "re-download or re-save it") from None


def expected_tensors(model: nn.Module, names, where: str, config_name: str) -> set[str]:
    """The parameter names a checkpoint holding `names` must fill; errors for missing or unexpected tensors."""
    expected = set(dict(model.named_parameters(remove_duplicate=False)))
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied checkpoints store the embedding once
    # old Llama checkpoints carry rotary_emb.inv_freq buffers; tied ones may carry a redundant lm_head copy
    extra = {k for k in names if k not in expected and not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"}
    missing = sorted(expected - set(names))
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) that {config_name} implies, e.g. "
                         f"{', '.join(missing[:3])}; the checkpoint is incomplete or does not match {config_name}")
    if extra:
        raise ValueError(f"{where} has {len(extra)} unexpected tensor(s), e.g. "
                         f"{', '.join(sorted(extra)[:3])}; it does not match {config_name}")
    return expected


def set_parameter(model: nn.Module, name: str, shape: tuple, file_name: str, config_name: str, read) -> None:
    """Check a checkpoint tensor's shape against the (meta) parameter, then make `read()` its storage."""
    want = tuple(model.get_parameter(name).shape)
    if shape != want:
        raise ValueError(f"tensor {name} in {file_name} has shape {shape} but {config_name} implies {want}")
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(read()))
