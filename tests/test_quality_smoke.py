"""Smoke test of the quality suite (benchmarks/quality) on its tiny --quick setting, plus the report's arithmetic, the
large (GPU) settings' construction and the time budget."""
import json
import math
import time

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

from benchmarks.quality import report, run, shampoo_ablation, tasks  # noqa: E402


def test_quick_suite_writes_results_and_lowbit_adamw32_matches_torch(tmp_path):
    payload = run.main(["--quick", "--seeds", "2", "--tasks", "digits_mlp,mnist1d_mlp",
                        "--optimizers", "torch_adamw,adamw32,adamw8,shampoo4", "--out", str(tmp_path)])
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"quality.{suffix}").stat().st_size > 0
    stored = json.loads((tmp_path / "quality.json").read_text())
    assert len(stored["runs"]) == 2 * 4 * 2
    rows = {(r["task"], r["optimizer"]): r for r in stored["summary"]}
    for task in ("digits_mlp", "mnist1d_mlp"):
        # Same seeds, same batches, same update rule in fp32: our 32-bit AdamW must track torch's.
        assert rows[(task, "adamw32")]["val_loss_mean"] == pytest.approx(rows[(task, "torch_adamw")]["val_loss_mean"],
                                                                        abs=1e-4)
        assert rows[(task, "adamw8")]["state_bytes_per_param"] < rows[(task, "torch_adamw")]["state_bytes_per_param"]
        assert all(r["finite"] for r in payload["runs"])
    assert any("lowbit AdamW 8-bit" in line for line in stored["checks"])


def test_compile_steps_our_first_order_rules_through_the_backend_and_tracks_eager(tmp_path):
    from torch._dynamo.utils import counters

    common = ["--quick", "--seeds", "1", "--tasks", "digits_mlp", "--optimizers", "adamw8,torch_adamw"]
    eager = run.main([*common, "--out", str(tmp_path / "eager")])
    counters.clear()
    compiled = run.main([*common, "--compile", "lowbit_aot_eager", "--out", str(tmp_path / "compiled")])
    assert counters["stats"]["unique_graphs"] > 0  # the step went through Dynamo, not eagerly
    flags = {r["optimizer"]: r["compiled"] for r in compiled["runs"]}
    assert flags == {"adamw8": True, "torch_adamw": False}
    assert compiled["environment"]["compile_backend"] == "lowbit_aot_eager"
    assert "compiled (backend lowbit_aot_eager)" in (tmp_path / "compiled" / "quality.md").read_text()
    by_run = {r["optimizer"]: r["val_loss"] for r in eager["runs"]}
    for r in compiled["runs"]:
        # The compiled step is the same rule and codecs: 20 steps stay within a few code steps of eager.
        assert r["val_loss"] == pytest.approx(by_run[r["optimizer"]], rel=2e-2)


def test_shampoo_ablation_variants_run_and_the_32_bit_reference_keeps_everything(tmp_path):
    payload = shampoo_ablation.main(["--quick", "--task", "digits_mlp", "--seeds", "2", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {run.REFERENCE, *shampoo_ablation.VARIANTS}
    assert rows["shampoo32"]["keeps"] == pytest.approx(1.0) and rows[run.REFERENCE]["keeps"] == pytest.approx(0.0)
    assert all(math.isfinite(r["mean"]) for r in rows.values())
    # Keeping the eigenvectors in fp32 leaves only the root's 4-bit off-diagonal: not the same run as 4-bit.
    assert payload["val_losses"]["eigenvectors_fp32"] != payload["val_losses"]["shampoo4_unrotated"]
    # The simulation is faithful: fp32 eigenvectors rounded wherever a refresh reads them is 4-bit storage again.
    assert payload["val_losses"]["rounded_for_both"] == payload["val_losses"]["shampoo4_unrotated"]
    assert (tmp_path / "quality.shampoo_ablation.md").read_text().count("\n| ") == len(rows) + 1


def _payload(losses_by_optimizer):
    runs = [dict(task="t", optimizer=name, seed=seed, val_loss=loss, val_acc=1 - loss, finite=True,
                 state_bytes_per_param=1.0, step_ms=1.0, opt_step_ms=1.0, val_curve=[(1, loss, 1 - loss)])
            for name, losses in losses_by_optimizer.items() for seed, loss in enumerate(losses)]
    return dict(reference="torch_adamw", optimizers={k: k for k in losses_by_optimizer}, tasks={"t": {}}, runs=runs)


def test_gap_is_in_pooled_seed_std_and_positive_when_worse():
    rows = {r["optimizer"]: r for r in report.summarize(_payload(
        {"torch_adamw": [0.10, 0.20, 0.30], "adamw8": [0.30, 0.40, 0.50], "adamw4": [0.0, 0.1, 0.2]}))}
    assert rows["adamw8"]["loss_gap_std"] == pytest.approx(2.0)  # 0.2 worse, both stds 0.1
    assert rows["adamw8"]["acc_gap_std"] == pytest.approx(2.0)  # accuracy 0.2 lower is also worse
    assert rows["adamw4"]["loss_gap_std"] == pytest.approx(-1.0)
    checks = report.verdicts(list(rows.values()))
    assert any("adamw8" in line and "MISSES 1 std" in line for line in checks)
    assert any("adamw4" in line and "within 2 std" in line for line in checks)
    assert math.isclose(rows["torch_adamw"]["loss_gap_std"], 0.0)


# (batch input shape, output shape, weight-matrix shapes, steps) of every task at the large scale.
LARGE = {
    "char_lm": ((32, 128), (32, 128, 103), {(384, 128), (128, 128), (512, 128), (128, 512), (103, 128)}, 800),
    "digits_mlp": ((64, 8, 8), (64, 10), {(512, 64), (512, 512), (10, 512)}, 600),
    "digits_cnn": ((64, 1, 8, 8), (64, 10), {(64, 1, 3, 3), (128, 64, 3, 3), (256, 2048), (10, 256)}, 600),
    "mnist1d_mlp": ((128, 40), (128, 10), {(512, 40), (512, 512), (10, 512)}, 1500),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_large_tasks_put_data_and_models_on_the_device_with_the_large_shapes(name):
    """The meta device stands in for a GPU: every tensor a run touches must land on the task's device, while the
    batch indices still come from the CPU generator (same draws as on the CPU, so the same batches in the same order
    for every optimizer and device)."""
    input_shape, output_shape, weights, steps = LARGE[name]
    task = tasks.TASKS[name](False, "meta", "large")
    assert (task.device, task.scale, task.steps) == (torch.device("meta"), "large", steps)
    assert task.shampoo == dict(precondition_frequency=steps // 40, inverse_root_frequency=5 * (steps // 40))
    torch.manual_seed(0)
    model = task.make_model()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {tuple(p.shape) for p in model.parameters() if p.dim() > 1} == weights
    on_device, on_cpu = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    inputs, targets = task.train_batch(on_device)
    assert inputs.device.type == targets.device.type == "meta" and tuple(inputs.shape) == input_shape
    assert tuple(model(inputs).shape) == output_shape
    val_inputs = task.val_set[0] if task.classification else task.val_set[0][0]
    assert val_inputs.device.type == "meta"
    if name == "char_lm":  # cheap to build twice: the same draws build the same batch on the CPU
        cpu_task = tasks.TASKS[name](False, "cpu", "large")
        cpu_inputs, _ = cpu_task.train_batch(on_cpu)
        assert torch.equal(on_device.get_state(), on_cpu.get_state()) and cpu_inputs.shape == inputs.shape
    if name == "mnist1d_mlp":
        assert (task.data_info["train"], task.data_info["val"]) == (16000, 4000)


def test_large_settings_are_larger_and_seeded_weights_do_not_depend_on_the_device():
    small, large = tasks.digits_mlp(False, "cpu", "small"), tasks.digits_mlp(False, "cpu", "large")
    numel = lambda task: sum(p.numel() for p in task.make_model().parameters())  # noqa: E731
    assert numel(large) > 4 * numel(small) and large.steps > small.steps and large.batch > small.batch
    assert small.shampoo == dict(precondition_frequency=10, inverse_root_frequency=20)
    torch.manual_seed(5)
    first = [p.detach().clone() for p in large.make_model().parameters()]
    torch.manual_seed(5)
    again = [p.detach().clone() for p in large.make_model().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # train() hands the task's refresh periods to every Shampoo choice.
    model = large.make_model()
    opt = run.build_optimizer("shampoo4", list(model.parameters()), large)
    assert (opt.precondition_frequency, opt.inverse_root_frequency) == (15, 75)
    assert run.default_name("cuda", "large") == "quality_gpu" and run.default_name("cpu", "small") == "quality"
    assert len({run.default_name(d, s) for d in ("cpu", "cuda") for s in tasks.SCALES}) == 4


def test_budget_stops_new_runs_and_reports_only_the_pairs_whose_seeds_all_ran(tmp_path, monkeypatch, capsys):
    """Every run 'takes' 10 s on a shifted clock: with a 25 s budget, torch AdamW's 2 seeds and one 8-bit seed run,
    then nothing more starts; the 8-bit pair and the whole second task are reported as skipped."""
    offset = [0.0]
    real_clock, real_train = time.perf_counter, run.train

    def slow_train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        offset[0] += 10.0
        return result
    monkeypatch.setattr(run, "train", slow_train)
    monkeypatch.setattr(run.time, "perf_counter", lambda: real_clock() + offset[0])
    payload = run.main(["--quick", "--seeds", "2", "--tasks", "digits_mlp,mnist1d_mlp", "--optimizers",
                        "torch_adamw,adamw8", "--budget-s", "25", "--out", str(tmp_path), "--name", "cut"])
    stored = json.loads((tmp_path / "cut.json").read_text())
    assert [(r["optimizer"], r["seed"]) for r in stored["runs"]] == [("torch_adamw", 0), ("torch_adamw", 1)]
    assert [(r["optimizer"], r["seed"]) for r in stored["incomplete_runs"]] == [("adamw8", 0)]
    assert [(s["task"], s["optimizer"], s["seeds_done"]) for s in stored["skipped"]] == [
        ("digits_mlp", "adamw8", 1), ("mnist1d_mlp", "torch_adamw", 0), ("mnist1d_mlp", "adamw8", 0)]
    assert [(r["task"], r["optimizer"], r["seeds"]) for r in stored["summary"]] == [("digits_mlp", "torch_adamw", 2)]
    assert list(stored["tasks"]) == ["digits_mlp"] and payload["environment"]["settings"].keys() == {"digits_mlp"}
    markdown = (tmp_path / "cut.md").read_text()
    assert markdown.startswith("# Quality suite (CPU, small settings, quick)")
    assert "| digits_mlp | torch AdamW fp32 | 2 |" in markdown and "| lowbit AdamW 8-bit |" not in markdown
    assert "mnist1d_mlp / lowbit AdamW 8-bit: 0 of 2 seeds ran" in markdown
    assert (tmp_path / "cut.png").stat().st_size > 0
    err = capsys.readouterr().err
    assert "digits_mlp/adamw8 (1/2 seeds ran)" in err and "digits_mlp: first run" in err and "estimate" in err


def test_report_title_says_where_and_at_which_settings():
    gpu = dict(torch="2.11", device="cuda", device_name="NVIDIA H100 80GB HBM3", threads=1, scale="large",
               quick=False)
    assert report.title(gpu) == "# Quality suite (GPU, large settings)"
    assert report.title(dict(torch="2.13", device="cpu", threads=1, quick=False)) == "# Quality suite (CPU, small settings)"
    payload = _payload({"torch_adamw": [0.1, 0.2], "adamw8": [0.2, 0.3]})
    payload["environment"] = gpu
    assert report.markdown(payload, report.summarize(payload)).startswith(
        "# Quality suite (GPU, large settings)\n\nNVIDIA H100 80GB HBM3, torch 2.11")
