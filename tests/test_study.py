"""study.py's aggregation on hand-made runs: means, spreads and Pareto marks per split, the per-seed and the
per-task (paired, bootstrap) comparison of the two schedules, pooled sub-task error rates, and dev loss curves
from training logs. Every expected value is computed by hand in the comments."""

import json
import os
from pathlib import Path

import pytest

import study

BUDGETS = {"max_new_tokens": 320}
TASKS = [{"task_id": f"song_{i}"} for i in range(1, 5)]


def errors(**cells) -> dict:
    """subtask_errors from role_k=(errors, n) keyword pairs, e.g. executor_1=(1, 4)."""
    table: dict = {}
    for key, (e, n) in cells.items():
        role, k = key.rsplit("_", 1)
        table.setdefault(k, {})[role] = {"n": n, "errors": e, "rate": 100.0 * e / n}
    return table


def write_run(root: Path, split: str, name: str, tgc: float, flops: dict, subtask_errors: dict | None = None,
              sgc: float | None = None, budgets=BUDGETS) -> None:
    metrics = {"tasks": 4, "passed": int(tgc / 25), "tgc": tgc, "sgc": tgc if sgc is None else sgc,
               "flops_per_task": sum(flops.values()), "subtask_errors": subtask_errors or {},
               "roles": {role: {"flops_per_task": f} for role, f in flops.items()}}
    folder = root / split / name
    folder.mkdir(parents=True)
    tasks = [{**t, "success": i < metrics["passed"]} for i, t in enumerate(TASKS)]  # the first `passed` pass
    (folder / "results.json").write_text(json.dumps({
        "name": name, "split": split, "scenarios": 2, "limit": None, "system": {"budgets": budgets},
        "tasks": tasks, "metrics": metrics,
        "timing": {"this_run": {"tasks": 0 if "s2" in name else 4, "seconds": 12.0 * len(name)}}}))


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """{first cell: cells} and {first cell/second cell: cells} of the first Markdown table after `heading`."""
    rows, inside = {}, False
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            inside = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if "---" not in line:
                rows[cells[0]] = rows[f"{cells[0]}/{cells[1]}"] = cells
        elif inside:
            break
    return rows


MULTI = {"planner": 1e12, "executor": 3e12, "critic": 1e12}


@pytest.fixture
def study_results(tmp_path) -> Path:
    root = tmp_path / "results"
    # progressive TGC 100, 50, 75: mean 75, sample sd sqrt((25^2 + 25^2 + 0) / 2) = 25.0
    for seed, tgc, executor_1 in ((0, 100.0, (0, 4)), (1, 50.0, (1, 4)), (2, 75.0, (0, 4))):
        write_run(root, "dev", f"multi-progressive-s{seed}", tgc, MULTI,
                  errors(planner_1=(0, 4), executor_1=executor_1, executor_2=(0, 2), critic_1=(1, 4)))
    # standard TGC 50, 50, 25: mean 41.7, sd sqrt((8.33^2 * 2 + 16.67^2) / 2) = 14.4; more FLOPs (retries)
    for seed, tgc, executor_1 in ((0, 50.0, (2, 4)), (1, 50.0, (1, 4)), (2, 25.0, (1, 4))):
        write_run(root, "dev", f"multi-full-s{seed}", tgc, {**MULTI, "executor": 5e12},
                  errors(planner_1=(0, 4), executor_1=executor_1, executor_2=(1, 2), critic_1=(0, 4)))
    write_run(root, "dev", "untrained-multi", 0.0, {"planner": 1e11, "executor": 1e11, "critic": 1e11})
    write_run(root, "dev", "single-qwen-progressive-s0", 75.0, {"single": 2e13})  # as good, more compute
    write_run(root, "dev", "single-progressive-s0", 25.0, {"single": 3e13}, errors(single_1=(1, 4)))
    write_run(root, "dev", "single-full-s0", 50.0, {"single": 3e13}, errors(single_1=(0, 4)))
    write_run(root, "test", "multi-progressive-s0", 0.0, MULTI, errors(executor_1=(4, 4)))
    write_run(root, "test", "untrained-multi", 0.0, {"planner": 1e11})
    return root


def test_systems_pareto_and_seed_comparison_on_dev(study_results, tmp_path, capsys):
    assert study.main([str(study_results), "--out", str(tmp_path / "out" / "study.md")]) == 0
    report = (tmp_path / "out" / "study.md").read_text()
    assert capsys.readouterr().out.startswith(report)
    dev = table_rows(report, "## dev: 4 tasks")
    header = dev["system"]
    assert header == ["system", "runs", "TGC", "TGC per seed", "SGC", "FLOPs/task", "planner", "executor",
                      "critic", "single", "Pareto"]
    assert dev["multi-progressive"][1:6] == ["3", "75.0 ± 25.0", "100, 50, 75", "75.0 ± 25.0", "5 T"]
    assert dev["multi-full"][1:6] == ["3", "41.7 ± 14.4", "50, 50, 25", "41.7 ± 14.4", "7 T"]
    assert dev["multi-full"][6:10] == ["1 T", "5 T", "1 T", "0"]
    assert dev["single-qwen-progressive"][9] == "20 T"
    # Pareto: the untrained base is cheapest, multi-progressive best for 5 T; standard (41.7 at 7 T) and the
    # single agent (75 at 20 T) are dominated by multi-progressive
    assert {name for name, cells in dev.items() if cells[-1] == "*" and "/" not in name} == {"untrained-multi", "multi-progressive"}
    # per seed: 100 > 50, 50 = 50, 75 > 25: progressive wins 2, standard 0; 75 - 41.7 = +33.3 > 25.0
    section = report[report.index("### multi: progressive vs standard on dev"):]
    assert "Progressive wins 2 of 3 seeds, standard 0; mean difference +33.3 TGC points (larger than the " \
           "larger seed spread, 25.0)." in section
    # paired per task, songs 1-4 (each run passes its first TGC/25 songs): progressive passes them in 3, 3, 2 and
    # 1 of its seeds, standard in 3, 2, 0, 0; differences (0, 1, 2, 1) / 3, mean 1/3. A resampled task's
    # difference in thirds is 0, 1 or 2 with odds 1:2:1, Binomial(2, 1/2), so four of them sum to
    # S ~ Binomial(8, 1/2) thirds, mean S / 12; P(S <= 0) = 1/256 < 2.5% < P(S <= 1) = 9/256, so the interval is
    # [1/12, 7/12] by symmetry
    assert "Paired per task (each task's pass rate over the seeds): +33.3, 95% bootstrap interval over the 4 " \
           "tasks [+8.3, +58.3]; progressive better on 3 tasks, standard on 0." in section
    assert "### multi: progressive vs standard on test" not in report  # test has no standard run
    single = report[report.index("### single: progressive vs standard on dev"):]
    assert "standard 1; mean difference -25.0 TGC points (one seed, so no spread to compare it with)" in single
    # one seed each: song 2 passes under standard only, d = (0, -1, 0, 0); a resample of 4 tasks draws song 2
    # K ~ Binomial(4, 1/4) times: P(K = 0) = 81/256 > 2.5% and P(K >= 3) = 13/256 > 2.5% > P(K = 4) = 1/256
    assert "pass rate over the seeds): -25.0, 95% bootstrap interval over the 4 tasks [-75.0, +0.0]; " \
           "progressive better on 0 tasks, standard on 1." in single


def test_error_rates_are_pooled_over_seeds(study_results, tmp_path):
    study.main([str(study_results), "--out", str(tmp_path / "study.md")])
    rows = table_rows((tmp_path / "study.md").read_text(), "Sub-task error rates, pooled over 3 and 3 seeds")
    # executor sub-task 1: (0 + 1 + 0) / 12 vs (2 + 1 + 1) / 12; sub-task 2: 0/6 vs 3/6
    assert rows["executor/1"][2:] == ["8% (1/12)", "33% (4/12)"]
    assert rows["executor/2"][2:] == ["0% (0/6)", "50% (3/6)"]
    assert rows["executor, all/"][2:] == ["6% (1/18)", "39% (7/18)"]
    assert rows["critic/1"][2:] == ["25% (3/12)", "0% (0/12)"]
    assert rows["planner/1"][2:] == ["0% (0/12)", "0% (0/12)"]
    assert [key for key in rows if "/" in key and key != "role/sub-task"] == [
        "planner/1", "planner, all/", "executor/1", "executor/2", "executor, all/", "critic/1", "critic, all/"]


def write_log(folder: Path, losses: list[dict | None]) -> None:
    folder.mkdir(parents=True)
    (folder / "train_log.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": 1.0, "seconds": 45.0, **({"dev_loss_by_subtask": d} if d else {})}) + "\n"
        for e, d in enumerate(losses, start=1)))


def test_dev_loss_curves_pair_the_schedules_and_skip_linked_roles(tmp_path):
    ckpts = tmp_path / "ckpts"
    write_log(ckpts / "multi-progressive-s0" / "planner", [{"1": 0.5, "2": 1.5}, {"1": 0.1, "2": 0.3}])
    write_log(ckpts / "multi-full-s0" / "planner", [{"1": 0.6, "2": 0.7}, {"1": 0.2, "2": 0.1}])
    write_log(ckpts / "multi-progressive-s1" / "planner", [None, None])  # trained without --dev-data: no curve
    write_log(ckpts / "multi-full-s1" / "planner", [{"1": 0.6}])
    (ckpts / "hetero-progressive-s0").mkdir()
    os.symlink("../multi-progressive-s0/planner", ckpts / "hetero-progressive-s0" / "planner")
    curves = study.dev_loss_curves(ckpts)
    assert sorted(curves) == ["multi-full-s0", "multi-full-s1", "multi-progressive-s0"]
    assert curves["multi-progressive-s0"]["planner"] == [{1: 0.5, 2: 1.5}, {1: 0.1, 2: 0.3}]
    assert study.curve_pairs(curves) == [("multi-progressive-s0", "multi-full-s0")]
    rows = table_rows(study.last_loss_table(curves, ("multi-progressive-s0", "multi-full-s0")), "| role")
    # the last epoch: (0.1 + 0.3) / 2 = 0.2 and (0.2 + 0.1) / 2 = 0.15
    assert rows["planner/progressive"][2:] == ["0.1000", "0.3000", "0.2000"]
    assert rows["planner/standard"][2:] == ["0.2000", "0.1000", "0.1500"]


def test_a_folder_without_results_or_with_mixed_budgets_is_one_line(tmp_path, capsys):
    assert study.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `make study` first" in err
    write_run(tmp_path, "dev", "a", 0.0, {"planner": 1.0})
    write_run(tmp_path, "dev", "b", 0.0, {"planner": 1.0}, budgets={"max_new_tokens": 64})
    assert study.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ in budgets" in err and not (tmp_path / "study.md").exists()


def test_time_by_run_counts_each_training_once(study_results, tmp_path):
    ckpts = tmp_path / "ckpts"
    for role in ("planner", "executor"):
        write_log(ckpts / "multi-progressive-s0" / role, [{"1": 0.5}, {"1": 0.1}])  # 2 roles x 2 epochs x 45 s
    (ckpts / "hetero-progressive-s0").mkdir()
    os.symlink("../multi-progressive-s0/executor", ckpts / "hetero-progressive-s0" / "executor")
    study.main([str(study_results), "--ckpts", str(ckpts), "--out", str(tmp_path / "study.md")])
    rows = table_rows((tmp_path / "study.md").read_text(), "## Time (minutes)")
    # 180 s = 3.0 min of training; evaluation 12 s per character of the name: 20 characters = 4.0 min
    assert rows["multi-progressive-s0"][1:] == ["3.0", "4.0", "4.0"]
    assert rows["multi-full-s1"][1:] == ["-", "2.6", "-"]
    assert rows["multi-full-s2"][1:] == ["-", "-", "-"]  # rerun with nothing left to do: not timed
    assert "hetero-progressive-s0" not in rows
