"""Smoke test of the quality suite (benchmarks/quality) on its tiny --quick setting, plus the report's arithmetic."""
import json
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

from benchmarks.quality import report, run, shampoo_ablation  # noqa: E402


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
