"""evaluate.py: scores checked against independent references. AppWorld's own evaluator judges every task
(the gold replay must pass all of them, doing nothing none of them); resumed and two-process runs must equal
one uninterrupted process; the Pareto marks and spreads are computed by hand; bad inputs give one line.

The mini-world is built once per test session (conftest.py); one pool of world worker processes is
shared by the whole file.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import agents
import evaluate
import lora
import model
import result_files
import rollout
import store
import systems
import trajectories
import world
from conftest import REPO, cpu_model_name, run_child, torchrun

SMALL = agents.Budgets(subtasks=2, executor_turns=2, critic_retries=1, format_retries=1, single_turns=3,
                       new_tokens=12, context=1024)
N_SMALL = 4  # tasks of the dev split the model-backed tests run


@pytest.fixture(scope="module")
def pool(mini_world):
    with world.WorldPool(2, root=mini_world) as p:
        yield p



def config(out, root, **kw) -> evaluate.EvalConfig:
    settings = dict(split="dev", out=str(out), root=str(root), workers=2, quiet=True)
    return evaluate.EvalConfig(**{**settings, **kw})


def without_timing(records: list[dict]) -> list[dict]:
    """Trajectories without the fields that measure the engine rather than the rollout."""
    return [{**r, "calls": [{k: v for k, v in c.items() if k not in trajectories.MEASURED_CALL_FIELDS}
                            for c in r["calls"]]}
            for r in records]


class DoNothing:
    """An engine whose planner declares the task finished at once."""
    name = "do-nothing"
    mixes_adapters = batches = False

    def complete(self, requests, adapters, budgets):
        return [agents.ModelReply(agents.FINISH, r.messages) for r in requests]


# ----------------------------------------------------------------------------------------------------
# Effectiveness bounds, judged by AppWorld's own evaluator.

def makefile_budgets() -> tuple[agents.Budgets, int]:
    """The budgets `make demo` evaluates under (BUDGETS in the Makefile, parsed by rollout.py's own flags) and
    the number of training scenarios whose dev variants it evaluates (SCENARIOS)."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    flags = re.search(r"^BUDGETS\s*\?=(.*)$", text, re.M).group(1).split()
    parser = argparse.ArgumentParser()
    rollout.add_common_flags(parser)
    budgets = rollout.budgets_from(parser.parse_args(["--split", "dev", "--out", "x", *flags]))
    return budgets, int(re.search(r"^SCENARIOS\s*\?=\s*(\d+)", text, re.M).group(1))


def test_gold_replay_under_the_demos_budgets_scores_100_on_the_dev_split(mini_world, pool, tiny_preset_model,
                                                                         tmp_path):
    """The demo's budgets admit every task: the gold solutions, replayed through the protocol under the
    Makefile's budgets, pass AppWorld's evaluator on the whole dev split (the demo runs its first
    SCENARIOS scenarios), and with the tiny preset's tokenizer every gold prompt fits the context budget
    without fitting and every gold reply fits the new-token budget, so a model that learned them could
    reproduce them."""
    budgets, n_scenarios = makefile_budgets()
    demo_dev = world.select_tasks("dev", mini_world, scenarios=n_scenarios)
    assert budgets.subtasks >= 8 and len(demo_dev) == 2 * n_scenarios
    results = evaluate.evaluate(systems.gold_system(mini_world), budgets, config(tmp_path, mini_world), pool=pool)
    dev = world.load_split("dev", root=mini_world)
    m = results["metrics"]
    assert (m["tasks"], m["passed"], m["tgc"]) == (len(dev), len(dev), 100.0)
    assert m["scenarios"] == len({t.split("_")[0] for t in dev}) and m["sgc"] == 100.0
    assert m["scenarios_left_out"] == 0 and m["budget_stops"] == {}
    records = trajectories.read_trajectories(tmp_path / result_files.TRAJECTORIES)
    assert [r["task_id"] for r in records] == dev  # merged in split order
    assert all(r["evaluation"]["passes"] and not r["evaluation"]["failures"] for r in records)
    difficulties = {world.task_metadata(t, root=mini_world)["difficulty"] for t in dev}
    assert {str(d) for d in difficulties} == set(m["by_difficulty"])
    assert all(v["tgc"] == 100.0 for v in m["by_difficulty"].values())
    # the gold code never raises and the gold critic never fails it
    assert all(cell["errors"] == 0 for row in m["subtask_errors"].values() for cell in row.values())
    assert (tmp_path / result_files.REPORT).read_text().count("TGC 100.0") == 1
    tokenizer = model.Tokenizer.from_pretrained(tiny_preset_model)
    for r in records:
        for call in r["calls"]:
            prompt = len(tokenizer.chat(call["messages"], add_generation_prompt=True)[0])
            reply = len(tokenizer.encode(call["output"])) + 1  # and the end-of-turn token
            assert prompt <= budgets.context - budgets.new_tokens and reply <= budgets.new_tokens, call["output"]


def test_a_do_nothing_system_scores_0(mini_world, pool, tmp_path):
    system = agents.single_engine_system(DoNothing())
    results = evaluate.evaluate(system, SMALL, config(tmp_path, mini_world), pool=pool)
    m = results["metrics"]
    assert (m["tgc"], m["sgc"], m["passed"]) == (0.0, 0.0, 0)
    records = trajectories.read_trajectories(tmp_path / result_files.TRAJECTORIES)
    assert all(r["evaluation"]["failures"] and not r["executions"] for r in records)
    assert m["subtask_errors"] == {"1": {"planner": {"n": len(records), "errors": 0, "rate": 0.0}}}


# ----------------------------------------------------------------------------------------------------
# Metrics on hand-built trajectories.

def hand_record(task_id, passed, planner, subtasks):
    """A multi-agent record. planner: {k: [reply, ...]}; subtasks: [[(raised per execution, report, verdict)
    per attempt]]. Conversations are one call each except the planner's (enough for the metrics)."""
    calls, executions, rows, critic = [], [], [], 0
    messages = [{"role": "system", "content": "plan"}, {"role": "user", "content": "Task"}]
    for k, replies in planner.items():
        for reply in replies:
            calls.append({"role": "planner", "conversation": 0, "subtask": k, "messages": list(messages),
                          "output": reply, "prompt_tokens": 1, "new_tokens": 1, "flops": 1.0, "seconds": 0.0,
                          "train": True})
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "next"}]
    for k, attempts in enumerate(subtasks, start=1):
        rows.append({"index": k, "text": f"step {k}", "attempts": []})
        for a, (raised, report, verdict) in enumerate(attempts, start=1):
            executions += [{"subtask": k, "attempt": a, "code": "x", "output": "", "error": e} for e in raised]
            rows[-1]["attempts"].append({"report": report, "verdict": verdict, "reason": ""})
            calls.append({"role": "critic", "conversation": critic, "subtask": k,
                          "messages": [{"role": "user", "content": "judge"}], "output": f"Verdict: {verdict}",
                          "prompt_tokens": 1, "new_tokens": 1, "flops": 1.0, "seconds": 0.0, "train": True})
            critic += 1
    record = {"schema": trajectories.SCHEMA_VERSION, "task_id": task_id, "split": "dev",
              "system": {"kind": "multi", "teacher": None, "roles": {}, "budgets": {}}, "instruction": "Task",
              "calls": calls, "executions": executions, "subtasks": rows,
              "evaluation": {"success": passed, "passes": [], "failures": [], "num_tests": 1}, "budget_stops": []}
    trajectories.validate_trajectory(record)
    return record


def test_subtask_error_rates_count_subtasks_per_role_by_hand():
    no_report = agents.NO_REPORT + "the executor ran out of turns)"
    a = hand_record("a_1", True, {1: ["chatter", "Sub-task: one"], 2: ["Sub-task: two"], 3: ["FINISH"]}, [
        [([True], "failed", "failure"), ([False, False], "done", "success")],  # a failed attempt, then a good one
        [([False], "done", "failure")]])  # the task passed, so this failure verdict is wrong
    b = hand_record("b_1", False, {1: ["Sub-task: one"], 2: ["Sub-task: two"], 3: ["hmm", "what"]}, [
        [([False], no_report, "success")],  # no report: the executor erred; the outcome is unknown
        [([False, True], "done", "success")]])  # the last execution raised: executor and critic erred
    errors = evaluate.subtask_errors([a, b])
    cell = evaluate.error_cell
    assert errors == {
        "1": {"planner": cell(2, 0), "executor": cell(2, 1), "critic": cell(1, 0)},
        "2": {"planner": cell(2, 0), "executor": cell(2, 1), "critic": cell(2, 2)},
        "3": {"planner": cell(2, 1)}}
    assert errors["2"]["critic"]["rate"] == 100.0 and errors["1"]["executor"]["rate"] == 50.0


def test_per_scenario_counts_and_role_errors_by_hand(tmp_path, capsys):
    no_report = agents.NO_REPORT + "the executor ran out of turns)"
    good = hand_record("s1_1", True, {1: ["Sub-task: one"], 2: ["FINISH"]}, [[([False], "done", "success")]])
    bad = hand_record("s1_2", False, {1: ["Sub-task: one"], 2: ["hmm"]}, [[([True], "failed", "success")]])
    lost = hand_record("s2_1", False, {1: ["Sub-task: one"], 2: ["FINISH"]}, [[([False], no_report, "failure")]])
    cell = evaluate.error_cell
    assert evaluate.by_scenario([good, bad, lost]) == {
        "s1": {"tasks": 2, "passed": 1,  # bad: no plan at 2, its execution raised, the critic called it a success
               "role_errors": {"planner": cell(4, 1), "executor": cell(2, 1), "critic": cell(2, 1)}},
        "s2": {"tasks": 1, "passed": 0, "role_errors": {"planner": cell(2, 0), "executor": cell(1, 1)}}}

    def run(folder, name, split, records):
        path = results_file(tmp_path / folder, name, 0.0, 0.0, 1e12, split=split)
        r = json.loads(Path(path).read_text())
        r["metrics"]["by_scenario"] = evaluate.by_scenario(records)
        Path(path).write_text(json.dumps(r))
        return path
    files = [run("t", "trained", "dev", [good, bad, lost]), run("g", "gold", "dev", [good, lost]),
             run("tt", "trained", "test", [hand_record("s3_1", False, {1: ["FINISH"]}, [])])]
    assert evaluate.main(["scenarios", *files]) == 0
    out = capsys.readouterr().out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    assert cells[0] == ["split", "scenario", "tasks", "trained solved", "gold solved", "trained: role errors"]
    assert cells[1] == ["dev", "s1", "2", "1/2", "1/1", "planner 1/4, executor 1/2, critic 1/2"]
    assert cells[2] == ["dev", "s2", "1", "0/1", "0/1", "planner 0/2, executor 1/1"]
    assert cells[3] == ["test", "s3", "1", "0/1", "-", "planner 0/1"]
    assert "dev: trained solves a variant of 1 of 2 scenarios, gold solves a variant of 1 of 2 scenarios" in out
    old = results_file(tmp_path / "old", "old", 0.0, 0.0, 1e12, split="dev")  # scored before by_scenario existed
    assert "no per-scenario metrics" in one_error_line(["scenarios", old], capsys)


def test_sgc_counts_only_scenarios_with_every_variant_in_the_run():
    split = ["s1_1", "s1_2", "s2_1", "s2_2", "s3_1", "s3_2"]
    ran = [hand_record("s1_1", True, {1: ["FINISH"]}, []), hand_record("s1_2", True, {1: ["FINISH"]}, []),
           hand_record("s2_1", True, {1: ["FINISH"]}, []), hand_record("s2_2", False, {1: ["FINISH"]}, []),
           hand_record("s3_1", True, {1: ["FINISH"]}, [])]  # s3_2 is beyond --limit
    m = evaluate.goal_completion(ran, split)
    assert (m["tasks"], m["passed"], m["tgc"]) == (5, 4, 80.0)
    assert (m["scenarios"], m["scenarios_passed"], m["scenarios_left_out"], m["sgc"]) == (2, 1, 1, 50.0)


# ----------------------------------------------------------------------------------------------------
# Resume and sharding change nothing.

@pytest.fixture(scope="module")
def uninterrupted(micro, mini_world, pool, tmp_path_factory):
    """The micro model in every role on the first dev tasks, one world at a time: (results, records)."""
    out = tmp_path_factory.mktemp("straight")
    system = rollout.local_system("multi", {r: str(micro) for r in trajectories.MULTI_AGENT_ROLES}, {})
    results = evaluate.evaluate(system, SMALL, config(out, mini_world, limit=N_SMALL, workers=1), pool=pool)
    return results, trajectories.read_trajectories(out / result_files.TRAJECTORIES)


def test_resumed_evaluation_equals_uninterrupted(uninterrupted, micro, mini_world, pool, tmp_path):
    straight, straight_records = uninterrupted
    assert straight["metrics"]["flops_per_task"] > 0 and straight["metrics"]["roles"]["planner"]["calls_per_task"] >= 1
    system = rollout.local_system("multi", {r: str(micro) for r in trajectories.MULTI_AGENT_ROLES}, {})
    with pytest.raises(evaluate.StopEvaluation):
        evaluate.evaluate(system, SMALL, config(tmp_path, mini_world, limit=N_SMALL, workers=1, stop_after_tasks=2),
                          pool=pool)
    before = (tmp_path / result_files.PARTS / "rank0.jsonl").read_text()
    assert len(before.splitlines()) == 2
    resumed = evaluate.evaluate(system, SMALL, config(tmp_path, mini_world, limit=N_SMALL, workers=1), pool=pool)
    assert resumed["metrics"] == straight["metrics"]
    records = trajectories.read_trajectories(tmp_path / result_files.TRAJECTORIES)
    assert without_timing(records) == without_timing(straight_records)
    merged = (tmp_path / result_files.TRAJECTORIES).read_text()
    assert merged.startswith(before)  # the two finished tasks were kept as written, not re-run


def test_plain_evaluation_equals_the_fast_path(uninterrupted, micro, mini_world, pool, tmp_path):
    """cfg.plain (evaluate.py --plain): agents.run_task on agents.PlainEngine (model.generate), one task after
    another in one world session, records what rollout.run_rollouts on the fast LocalEngine records."""
    straight, straight_records = uninterrupted
    system = agents.build_system("multi", {r: str(micro) for r in trajectories.MULTI_AGENT_ROLES}, {})
    plain = evaluate.evaluate(system, SMALL, config(tmp_path, mini_world, limit=N_SMALL, plain=True), pool=pool)
    assert plain["metrics"] == straight["metrics"]
    records = trajectories.read_trajectories(tmp_path / result_files.TRAJECTORIES)
    assert without_timing(records) == without_timing(straight_records)
    assert store.read_identity(tmp_path)["decode"] == {role: "plain" for role in trajectories.MULTI_AGENT_ROLES}


def test_resume_refuses_a_folder_of_another_system(mini_world, pool, tmp_path):
    evaluate.evaluate(agents.single_engine_system(DoNothing()), SMALL, config(tmp_path, mini_world, limit=1),
                      pool=pool)
    with pytest.raises(ValueError, match="holds a different run .*system.teacher.*--overwrite"):
        evaluate.evaluate(systems.gold_system(mini_world), SMALL, config(tmp_path, mini_world, limit=1), pool=pool)


def test_evaluation_identity_knows_world_and_models_by_content_so_moved_copies_resume(micro, mini_world, tmp_path):
    def system(folder):
        return rollout.local_system("multi", {r: str(folder) for r in trajectories.MULTI_AGENT_ROLES}, {})
    identity = result_files.evaluation_identity
    saved = identity(system(micro), SMALL, "dev", mini_world, {})
    mixing = rollout.local_system("multi", {r: str(micro) for r in trajectories.MULTI_AGENT_ROLES}, {},
                                  mix_adapters=True)
    with pytest.raises(ValueError, match=r'holds a different run \(decode.critic.adapters: "merged" there vs "mixed"'):
        store.check_identity(tmp_path, saved, identity(mixing, SMALL, "dev", mini_world, {}), "-")
    shutil.copytree(mini_world, tmp_path / "world")
    shutil.copytree(micro, tmp_path / "model")
    moved = identity(system(tmp_path / "model"), SMALL, "dev", tmp_path / "world", {})
    assert moved[store.PATHS] != saved[store.PATHS]
    store.check_identity(tmp_path, saved, moved, "-")  # the same run: no error
    task = tmp_path / "world" / "data" / "tasks" / world.load_split("dev", root=mini_world)[-1] / "specs.json"
    task.write_text(task.read_text().replace('"instruction": "', '"instruction": "Please, '))
    with pytest.raises(ValueError, match=r"holds a different run \(world: "):
        store.check_identity(tmp_path, saved, identity(system(tmp_path / "model"), SMALL, "dev", tmp_path / "world",
                                                       {}), "-")
    config_file = tmp_path / "model" / "config.json"
    config_file.write_text(config_file.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(ValueError, match=r"holds a different run \(models.critic: .*models.executor: "):
        store.check_identity(tmp_path, saved, identity(system(tmp_path / "model"), SMALL, "dev", mini_world, {}), "-")


def test_two_gloo_processes_merge_to_the_single_process_result(uninterrupted, micro, mini_world, tmp_path):
    straight, straight_records = uninterrupted
    run_child(torchrun(2, "evaluate.py", "--model", str(micro), "--split", "dev", "--root", str(mini_world),
                       "--limit", str(N_SMALL), "--workers", "1", "--out", str(tmp_path), "--device", "cpu", "--quiet",
                       *[f"--max-{k.replace('_', '-')}={v}" for k, v in SMALL.__dict__.items()]))
    merged = json.loads((tmp_path / result_files.RESULTS).read_text())
    assert merged["metrics"] == straight["metrics"]
    assert merged["timing"]["this_run"]["processes"] == 2
    [machine] = merged["timing"]["this_run"]["machines"]  # both processes ran here
    assert machine.startswith(cpu_model_name()) and machine.endswith(" torch threads")
    assert f"on 2 process(es) ({machine})" in (tmp_path / result_files.REPORT).read_text()
    merged_records = trajectories.read_trajectories(tmp_path / result_files.TRAJECTORIES)
    assert without_timing(merged_records) == without_timing(straight_records)


# ----------------------------------------------------------------------------------------------------
# Rebuilding a system from prost.py's output folder.

def write_role_adapters(base: Path, out: Path, roles=trajectories.MULTI_AGENT_ROLES, dropout=0.0, scale=0.02) -> None:
    """A PEFT-layout adapter per role on the same base, each with its own non-zero weights."""
    net = model.Transformer.from_pretrained(base)
    for i, role in enumerate(roles):
        lora.add_adapter(net, role, r=2, alpha=4, dropout=dropout, targets=("q_proj", "v_proj"))
        torch.manual_seed(i)
        with torch.no_grad():
            for layer in lora.lora_layers(net).values():
                if role in layer.lora_B:
                    layer.lora_B[role].normal_(0, scale)
        lora.save_adapter(net, out / role, role)


def test_agents_folder_rebuilds_roles_on_one_shared_base(micro, mini_world, pool, tmp_path):
    write_role_adapters(micro, tmp_path / "ckpts")
    spec = systems.system_spec(agents_dir=tmp_path / "ckpts")
    assert spec.models == {r: str(micro) for r in trajectories.MULTI_AGENT_ROLES}  # the base each adapter recorded
    system = systems.load_system(spec, "cpu", "float32")
    engines = {id(b.engine) for b in system.roles.values()}
    assert len(engines) == 1 and {r: b.adapter for r, b in system.roles.items()} == {
        r: r for r in trajectories.MULTI_AGENT_ROLES}
    results = evaluate.evaluate(system, SMALL, config(tmp_path / "out", mini_world, limit=1), pool=pool)
    assert {r: b["adapter"] for r, b in results["system"]["roles"].items()} == {
        r: str(tmp_path / "ckpts" / r) for r in trajectories.MULTI_AGENT_ROLES}


def test_a_changed_adapter_in_the_same_folder_is_refused_unless_overwrite(micro, mini_world, pool, tmp_path):
    """Retraining into the same ckpts/ must not reuse the old system's trajectories."""
    write_role_adapters(micro, tmp_path / "ckpts")
    spec = systems.system_spec(agents_dir=tmp_path / "ckpts")
    cfg = config(tmp_path / "out", mini_world, limit=1)
    first = evaluate.evaluate(systems.load_system(spec, "cpu", "float32"), SMALL, cfg, pool=pool)
    weights = tmp_path / "ckpts" / "planner" / lora.ADAPTER_WEIGHTS
    tensors = load_file(weights)
    save_file({k: v * 2 for k, v in tensors.items()}, weights)  # "retrained" in place
    changed = systems.load_system(spec, "cpu", "float32")
    with pytest.raises(ValueError, match=r"out holds a different run \(adapters.planner: .* there vs .* now\); "
                                         r"use a new --out, or pass --overwrite"):
        evaluate.evaluate(changed, SMALL, cfg, pool=pool)
    assert json.loads((tmp_path / "out" / result_files.RESULTS).read_text()) == first  # untouched
    again = evaluate.evaluate(changed, SMALL, config(tmp_path / "out", mini_world, limit=1, overwrite=True), pool=pool)
    assert again["timing"]["this_run"]["tasks"] == 1  # run again, not reused
    assert again["adapters"]["planner"]["sha256"] != first["adapters"]["planner"]["sha256"]
    assert again["adapters"]["executor"] == first["adapters"]["executor"]
    other_dtype = systems.load_system(spec, "cpu", "bfloat16")
    with pytest.raises(ValueError, match=r"dtype.planner: \"float32\" there vs \"bfloat16\" now"):
        evaluate.evaluate(other_dtype, SMALL, cfg, pool=pool)


def test_unfinished_adapters_are_refused_then_reported_when_allowed(micro, mini_world, tmp_path, capsys):
    import prost
    import train_config
    from test_data import synthetic_trajectory
    trajectory_file = tmp_path / "train.jsonl"
    trajectories.write_trajectories(trajectory_file, [synthetic_trajectory("a", n_subtasks=2)])
    prost.train(train_config.TrainConfig(model=str(micro), role="planner", data=str(trajectory_file),
                                         out=str(tmp_path / "ck"), epochs=2, subtasks_per_epoch=2, stop_after_epochs=1,
                                         micro_batch_size=2, grad_accum=1, max_seq_len=256, lora_r=2, progress=False))
    for role in ("executor", "critic"):
        shutil.copytree(tmp_path / "ck" / "planner", tmp_path / "ck" / role)
    argv = ["--agents", str(tmp_path / "ck"), "--root", str(mini_world), "--limit", "1", "--workers", "1",
            "--out", str(tmp_path / "out"), "--quiet", *[f"--max-{k.replace('_', '-')}={v}" for k, v in
                                                         SMALL.__dict__.items()]]
    err = one_error_line(argv, capsys)
    assert "the planner's adapter" in err and "stopped after epoch 1 of 2 (stopped by --stop-after-epochs 1)" in err
    assert "--allow-unfinished" in err and not (tmp_path / "out").exists()
    assert evaluate.main([*argv, "--allow-unfinished"]) == 0
    report = (tmp_path / "out" / result_files.REPORT).read_text()
    assert report.count("epoch 1 of 2 **(unfinished)**") == 3 and "**Unfinished training**" in report
def test_a_system_loaded_from_ckpts_runs_without_dropout_and_repeats_itself(micro, mini_world, pool, tmp_path):
    """Adapters saved with dropout 0.5 (what prost.py records) and large weights, loaded exactly as
    evaluate.py loads them: no module may be in training mode, and two runs give the same trajectories."""
    write_role_adapters(micro, tmp_path / "ckpts", dropout=0.5, scale=0.5)
    system = systems.load_system(systems.system_spec(agents_dir=tmp_path / "ckpts"), "cpu", "float32")
    planner = system.roles["planner"].engine.models["planner"]
    assert lora.lora_layers(planner) and not [n for n, m in planner.named_modules() if m.training]
    runs = [evaluate.evaluate(system, SMALL, config(tmp_path / f"run{i}", mini_world, limit=2, workers=1), pool=pool)
            for i in (1, 2)]
    assert runs[0]["metrics"] == runs[1]["metrics"]
    first, second = (without_timing(trajectories.read_trajectories(tmp_path / f"run{i}" / result_files.TRAJECTORIES))
                     for i in (1, 2))
    assert first == second


# ----------------------------------------------------------------------------------------------------
# The Pareto table, on a hand-built example.

def results_file(folder: Path, name: str, tgc: float, sgc: float, flops: float, **fields) -> str:
    folder.mkdir(parents=True)
    (folder / result_files.RESULTS).write_text(json.dumps(
        {"name": name, "metrics": {"tgc": tgc, "sgc": sgc, "flops_per_task": flops}, **fields}))
    return str(folder / result_files.RESULTS)


def test_pareto_marks_the_right_systems(tmp_path, capsys):
    files = [results_file(tmp_path / "a", "large-single", 50.0, 30.0, 1e15),     # best TGC: optimal
             results_file(tmp_path / "b", "small-multi-s0", 40.0, 20.0, 1e13),   # seeds of one system:
             results_file(tmp_path / "c", "small-multi-s1", 44.0, 30.0, 1e13),   # mean 42, optimal
             results_file(tmp_path / "d", "same-cost-worse", 41.0, 25.0, 1e13),  # same FLOPs, lower TGC
             results_file(tmp_path / "e", "wasteful", 30.0, 10.0, 5e14),         # dominated by small-multi
             results_file(tmp_path / "f", "cheapest", 10.0, 0.0, 1e12)]          # least compute: optimal
    assert evaluate.main(["pareto", *files, "--plot", str(tmp_path / "p.png")]) == 0
    table = capsys.readouterr().out
    rows = {cells[0]: cells for line in table.splitlines() if line.startswith("| ") and "---" not in line
            for cells in [[c.strip() for c in line.strip("|").split("|")]] if cells[0] != "system"}
    assert {name for name, cells in rows.items() if cells[5] == "*"} == {"large-single", "small-multi", "cheapest"}
    # mean and sample standard deviation over the two seeds: sqrt(((40-42)^2 + (44-42)^2) / 1) = 2.83
    assert rows["small-multi"][1:4] == ["2", "42.0 ± 2.8", "25.0 ± 7.1"]
    assert list(rows) == ["cheapest", "small-multi", "same-cost-worse", "wasteful", "large-single"]


@pytest.mark.parametrize("field, a, b, shown", [
    ("split", "dev", "test", '"dev" vs "test"'),
    ("limit", 12, None, "12 vs null"),
    ("system", {"budgets": {"new_tokens": 48}}, {"budgets": {"new_tokens": 96}},
     '{"new_tokens": 48} vs {"new_tokens": 96}'),
    ("tasks", [{"task_id": "x_1"}], [{"task_id": "y_1"}], "the task ids"),
])
def test_pareto_refuses_runs_with_different_splits_limits_budgets_or_tasks(tmp_path, capsys, field, a, b, shown):
    same = dict(split="dev", limit=12, system={"budgets": {"new_tokens": 48}}, tasks=[{"task_id": "x_1"}])
    one = results_file(tmp_path / "a", "one", 50.0, 30.0, 1e15, **{**same, field: a})
    two = results_file(tmp_path / "b", "two", 40.0, 20.0, 1e13, **{**same, field: b})
    err = one_error_line(["pareto", one, two], capsys)
    assert f"{one} and {two} differ in {'budgets' if field == 'system' else field}" in err and shown in err
    assert "no pareto" not in capsys.readouterr().out.lower()


def test_compare_puts_systems_in_rows_and_splits_in_columns(tmp_path, capsys):
    def run(folder, name, split, passed, tasks, flops, budgets=48):
        metrics = {"passed": passed, "tasks": tasks, "scenarios_passed": 0, "scenarios": 1}
        path = results_file(tmp_path / folder, name, 100.0 * passed / tasks, 0.0, flops, split=split,
                            limit=None, system={"budgets": {"new_tokens": budgets}},
                            tasks=[{"task_id": f"{split}_{i}"} for i in range(tasks)])
        r = json.loads(Path(path).read_text())
        r["metrics"].update(metrics)
        Path(path).write_text(json.dumps(r))
        return path
    files = [run("z-dev", "zero-shot", "dev", 0, 4, 2e12), run("t-dev", "trained", "dev", 3, 4, 3e12),
             run("t-test", "trained", "test", 1, 4, 5e12)]
    assert evaluate.main(["compare", *files]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["system", "dev TGC", "dev SGC", "dev FLOPs/task", "test TGC", "test SGC", "test FLOPs/task"]
    assert cells[1][:2] == ["zero-shot", "0.0 (0/4)"] and cells[1][4:] == ["-", "-", "-"]  # never ran on test
    assert cells[2][1] == "75.0 (3/4)" and cells[2][4] == "25.0 (1/4)"
    other = run("t2-dev", "trained-long", "dev", 4, 4, 9e12, budgets=96)  # a dev run under other budgets
    err = one_error_line(["compare", *files, other], capsys)
    assert "differ in budgets" in err


def test_paired_difference_and_its_bootstrap_interval_by_hand(tmp_path, capsys):
    def run(folder, name, passes, split="dev"):
        tasks = [{"task_id": f"s{i}_1", "success": bool(p)} for i, p in enumerate(passes)]
        return results_file(tmp_path / folder, name, 100.0 * sum(passes) / len(passes), 0.0, 1e12, split=split,
                            limit=None, system={"budgets": {"new_tokens": 48}}, tasks=tasks)

    def rows(files):
        assert evaluate.main(["paired", *files]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:] if "---" not in line]

    # Seeds averaged per task: progressive passes task 0 twice and task 1 once of two seeds, standard only task 1.
    # The differences (1, -0.5) mean +25 points; resampling two tasks gives means 1, 0.25 and -0.5 with
    # probabilities 1/4, 1/2, 1/4, so the 95% interval runs from the lowest to the highest.
    seeds = [run("p0", "progressive-s0", [1, 0]), run("p1", "progressive-s1", [1, 1]), run("f0", "full-s0", [0, 1])]
    assert rows(seeds) == [["dev", "2", "75.0 (2)", "50.0 (1)", "+25.0", "[-50.0, +100.0]", "1 / 1"]]
    # 20 tasks, half won by the first system and none by the second: the mean of 20 resampled differences is
    # Binomial(20, 1/2) / 20, whose 2.5% and 97.5% quantiles are 6/20 and 14/20 (its CDF: 0.021 at 5, 0.058 at 6,
    # 0.942 at 13, 0.979 at 14).
    half = [run("a", "a", [1] * 10 + [0] * 10), run("b", "b", [0] * 20)]
    assert rows(half) == [["dev", "20", "50.0 (1)", "0.0 (1)", "+50.0", "[+30.0, +70.0]", "10 / 0"]]
    # A second split given in the other order still subtracts the first-named system: a's test row is a - b.
    b_test, a_test = run("b-test", "b", [1, 1], split="test"), run("a-test", "a", [0, 1], split="test")
    assert rows([*half, b_test, a_test])[1] == ["test", "2", "50.0 (1)", "100.0 (1)", "-50.0", "[-100.0, +0.0]",
                                                "0 / 1"]
    err = one_error_line(["paired", *half, run("c", "c", [1] * 20)], capsys)
    assert "exactly two systems" in err and "got 3" in err
    assert "has runs of a only" in one_error_line(["paired", *half, a_test], capsys)
    bare = [results_file(tmp_path / n, n, 0.0, 0.0, 1e12, split="dev") for n in ("x", "y")]  # no task rows
    assert "has no per-task results" in one_error_line(["paired", *bare], capsys)
    other_tasks = run("d", "d", [1] * 19)
    assert "differ in tasks" in one_error_line(["paired", half[0], other_tasks], capsys)


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2.

def one_error_line(argv: list[str], capsys) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_inputs_give_one_clear_line(mini_world, micro, tmp_path, capsys):
    common = ["--root", str(mini_world), "--out", str(tmp_path / "out")]
    assert "does not exist" in one_error_line(["--agents", str(tmp_path / "missing"), *common], capsys)
    (tmp_path / "empty").mkdir()
    assert "holds no trained role" in one_error_line(["--agents", str(tmp_path / "empty"), *common], capsys)
    write_role_adapters(micro, tmp_path / "partial", roles=("planner", "executor"))
    assert "no adapter for the critic" in one_error_line(["--agents", str(tmp_path / "partial"), *common], capsys)
    moved = tmp_path / "moved_base"
    write_role_adapters(micro, tmp_path / "orphans")
    for role in trajectories.MULTI_AGENT_ROLES:  # as if the base model's folder had been moved away
        config_path = tmp_path / "orphans" / role / lora.ADAPTER_CONFIG
        config_path.write_text(config_path.read_text().replace(json.dumps(str(micro)), json.dumps(str(moved))))
    err = one_error_line(["--agents", str(tmp_path / "orphans"), *common], capsys)
    assert "cannot be found" in err and str(moved) in err
    err = one_error_line(["--model", str(micro), "--split", "nope", *common], capsys)
    assert "no split 'nope'" in err and "dev" in err
