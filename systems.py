"""systems.py: which system an evaluation runs, rebuilt from what prost.py left, checked before anything loads.

Where this sits: between prost.py and evaluate.py. prost.py writes one PEFT adapter per role into
`ckpts/<role>/`, each recording its base model, with `progress.json` saying how far its training run got
(store.py). evaluate.py's command line names a system: `--agents ckpts/` (planner, executor, critic),
`--single ckpts/single`, `--model ID` (the untrained base in every role) or `--gold` (the mini-world's gold
replay). This file turns that into an agents.System: it finds the role folders, reads each adapter's base and
checks that it can be found, records each adapter's content hash and training progress (an adapter of an
unfinished run is refused unless --allow-unfinished), and loads every distinct base once, on agents.py's plain
engine (`--plain`) or on rollout.py's fast LocalEngine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import agents
import lora
import model_io
import rollout
import store
import trajectories


# ----------------------------------------------------------------------------------------------------
# The system's roles: each one's base model and adapter folder.

@dataclass
class SystemSpec:
    """What to load: the kind, each role's base model, each role's adapter folder (None = the base)."""
    kind: str  # "multi" or "single"
    models: dict[str, str | None]
    adapters: dict[str, str | None]
    label: str  # used in the default output name

    @property
    def roles(self) -> tuple[str, ...]:
        return trajectories.MULTI_AGENT_ROLES if self.kind == "multi" else ("single",)


def role_folders(agents_dir: str | Path) -> dict[str, str]:
    """{role: adapter folder} for planner, executor and critic under `agents_dir` (prost.py's --out)."""
    root = Path(agents_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"agents folder {root} does not exist; train the roles first with "
                                f"`python prost.py --role ROLE --out {root}`")
    found = {role: str(root / role) for role in trajectories.MULTI_AGENT_ROLES
             if (root / role / lora.ADAPTER_CONFIG).is_file()}
    if not found:
        raise ValueError(f"{root} holds no trained role: expected sub-folders planner/, executor/ and critic/, "
                         f"each with {lora.ADAPTER_CONFIG} (what `python prost.py --out {root}` writes)")
    missing = [role for role in trajectories.MULTI_AGENT_ROLES if role not in found]
    if missing:
        raise ValueError(f"{root} has no adapter for the {', '.join(missing)} (no {lora.ADAPTER_CONFIG} in "
                         f"{', '.join(str(root / r) for r in missing)}); train it with prost.py --role")
    return found


def single_folder(path: str | Path) -> str:
    """The single agent's adapter folder: PATH itself, or PATH/single (a prost.py --out root)."""
    path = Path(path)
    for candidate in (path, path / "single"):
        if (candidate / lora.ADAPTER_CONFIG).is_file():
            return str(candidate)
    if not path.exists():
        raise FileNotFoundError(f"single-agent folder {path} does not exist; train it with "
                                "`python prost.py --role single --out ckpts` (then pass ckpts/single)")
    raise ValueError(f"{path} holds no trained single agent (no {lora.ADAPTER_CONFIG} in it or in {path / 'single'})")


def recorded_base(adapter: str, role: str) -> str:
    try:
        return lora.adapter_base(adapter)
    except ValueError as e:  # json.JSONDecodeError included
        raise ValueError(f"cannot read the {role}'s adapter in {adapter}: {e}") from None


def check_base_found(base: str, role: str, adapter: str | None) -> None:
    """Fail before loading anything when a base model cannot be found (a moved folder, a hub id offline)."""
    try:
        model_io.resolve_model_dir(base)
    except (FileNotFoundError, ValueError) as e:
        where = f"the {role}'s adapter {adapter} was trained on base '{base}'" if adapter else \
            f"the {role}'s model '{base}'"
        fix = (f"restore it, or set base_model_name_or_path in {Path(adapter) / lora.ADAPTER_CONFIG} to where it "
               "is now") if adapter else "check the id or folder"
        raise FileNotFoundError(f"{where}, which cannot be found ({e}); {fix}") from None


def system_spec(agents_dir=None, single=None, model_id=None, kind="multi") -> SystemSpec:
    """Decide every role's base and adapter from the command line, and check that all of them exist."""
    if sum(bool(x) for x in (agents_dir, single, model_id)) != 1:
        raise ValueError("give exactly one of --agents CKPTS, --single CKPTS/single, --model ID (or --gold)")
    if agents_dir:
        spec = SystemSpec("multi", {}, role_folders(agents_dir), Path(agents_dir).resolve().name)
    elif single:
        spec = SystemSpec("single", {}, {"single": single_folder(single)}, Path(single).resolve().name)
    else:
        spec = SystemSpec(kind, {}, {}, Path(str(model_id)).name)
    for role in spec.roles:
        adapter = spec.adapters.get(role)
        spec.models[role] = recorded_base(adapter, role) if adapter else model_id
        check_base_found(spec.models[role], role, adapter)
    return spec


def load_system(spec: SystemSpec, device: str, dtype: str, engine: dict | None = None,
                plain: bool = False) -> agents.System:
    """Load each distinct base once (roles sharing it switch adapters) with the role adapters on it: on
    agents.PlainEngine when `plain`, else on the fast rollout.LocalEngine with `engine` options."""
    if plain:
        return agents.build_system(spec.kind, spec.models, spec.adapters,
                                   lambda base: agents.PlainEngine(base, device, dtype))
    return rollout.local_system(spec.kind, spec.models, spec.adapters, device, dtype, **(engine or {}))


def gold_system(root=None) -> agents.System:
    """The mini-world's gold sub-tasks replayed through the multi-agent protocol: the upper bound of what
    the protocol can score (no deliberate mistakes, so no recovery detours)."""
    import teacher  # the one module that knows the mini-world's solutions
    return agents.single_engine_system(teacher.GoldEngine(root, recovery_share=0.0), teacher="gold")


# ----------------------------------------------------------------------------------------------------
# Provenance: each adapter by content, and how far the training run that wrote it got.

def adapter_provenance(folder: str, role: str, allow_unfinished: bool) -> dict:
    """The adapter's content hash and how far the prost.py run that wrote it got. An adapter of an
    unfinished run (stopped early, diverged, or its files changed after the run's last checkpoint) is
    refused unless `allow_unfinished`; a folder without a training record (a PEFT adapter made elsewhere)
    is taken as it is."""
    if not (Path(folder) / lora.ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"the {role}'s adapter folder {folder} has no {lora.ADAPTER_WEIGHTS}")
    sha = store.files_sha256(folder, [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS])
    progress = store.read_progress(folder)
    if progress is None:
        return {"sha256": sha, "training": None, "unfinished": None}
    epoch, epochs = progress["epoch"], progress["epochs"]
    unfinished = None
    if progress["adapter_sha256"] != sha:
        unfinished = (f"its files are not those of the run's last checkpoint (epoch {epoch} of {epochs}): a "
                      "checkpoint write was interrupted")
    elif not progress["finished"]:
        unfinished = f"its training run stopped after epoch {epoch} of {epochs}" + (
            f" ({progress['stopped']})" if progress.get("stopped") else "")
    if unfinished and not allow_unfinished:
        raise ValueError(f"the {role}'s adapter {folder} is from an unfinished training run: {unfinished}; finish "
                         "it with `prost.py ... --resume`, or pass --allow-unfinished to evaluate it anyway")
    return {"sha256": sha, "training": {"epoch": epoch, "epochs": epochs}, "unfinished": unfinished}


def adapters_provenance(adapters: dict[str, str | None], allow_unfinished: bool) -> dict[str, dict]:
    return {role: adapter_provenance(folder, role, allow_unfinished) for role, folder in adapters.items() if folder}


# ----------------------------------------------------------------------------------------------------
# evaluate.py's command line: what to load, checked before anything loads; then loading it.

def planned_system(args) -> tuple[SystemSpec | None, str]:
    """(what to load, its default name), checked but not loaded yet (None: the gold replay). An adapter of
    an unfinished training run is refused here, before any model loads."""
    if args.gold:
        if args.agents or args.single or args.model:
            raise ValueError("give exactly one of --agents CKPTS, --single CKPTS/single, --model ID or --gold")
        return None, "gold"
    spec = system_spec(args.agents, args.single, args.model, args.kind)
    adapters_provenance(spec.adapters, args.allow_unfinished)
    return spec, spec.label


def load_planned(spec: SystemSpec | None, args, device: str) -> agents.System:
    if spec is None:
        return gold_system(args.root)
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
    return load_system(spec, device, dtype, rollout.engine_options(args), plain=args.plain)
