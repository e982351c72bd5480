"""The main job (``python -m lowbit_compile.demo``) and the step-time benchmark, run in-process on tiny sizes."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lowbit_compile import demo
from lowbit_compile.optim import state_formats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def expected_state_bytes_per_param(bits: int) -> float:
    """AdamW's m and v for the quick model's parameters in the formats ``bits`` selects, fp32 below 4096 elements."""
    model = demo.CharTransformer(len(demo.CharData.from_pydoc_topics().vocab), demo.QUICK_CONFIG)
    formats = state_formats(bits, m=True, v=False).values()
    numels = [p.numel() for p in model.parameters()]
    return sum(fmt.state_bytes(n) for n in numels for fmt in formats) / sum(numels)


def test_quick_demo_trains_all_optimizers_and_writes_table_and_plot(tmp_path, capsys, keep_torch_threads):
    # One thread: intra-op thread pools spin-wait and crawl when the test shares its cores with other work.
    results = demo.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    printed = capsys.readouterr().out

    assert [r.name for r in results] == list(demo.OPTIMIZERS)
    by_name = {r.name: r for r in results}
    for r in results:
        assert len(r.train_losses) == demo.QUICK_CONFIG.steps
        assert all(math.isfinite(x) for x in r.train_losses), r.name
        assert all(math.isfinite(loss) for _, loss in r.val_curve), r.name
        first, last = sum(r.train_losses[:5]) / 5, sum(r.train_losses[-5:]) / 5
        assert last < first - 0.3, (r.name, first, last)
        assert r.val_loss < r.train_losses[0] - 0.3, (r.name, r.train_losses[0], r.val_loss)
        assert r.opt_step_ms > 0 and r.step_ms >= r.opt_step_ms, r.name
        assert any(line.startswith(f"| {r.label} ") for line in printed.splitlines()), r.label
    for name in ("adamw32", "adamw8", "adamw4"):
        assert by_name[name].graphs_compiled >= 1 and by_name[name].compile_s > 0, name

    # Same math in fp32: the compiled 32-bit step follows torch's AdamW to rounding over 30 steps.
    assert abs(by_name["adamw32"].val_loss - by_name["torch"].val_loss) < 0.02
    # State is stored in the declared bits (torch adds a 4-byte step counter per tensor).
    for name, bits in (("torch", 32), ("adamw32", 32), ("adamw8", 8), ("adamw4", 4)):
        assert by_name[name].state_bytes_per_param == pytest.approx(expected_state_bytes_per_param(bits), rel=0.01)
    assert by_name["adamw4"].state_bytes_per_param < by_name["adamw8"].state_bytes_per_param < 6

    plot = tmp_path / "loss.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in summary["results"]] == list(demo.OPTIMIZERS)
    assert len(summary["text_sha256"]) == 64


def test_demo_rejects_unknown_optimizer(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--optimizers", "torch,adamw3"])
    assert "--optimizers: unknown ['adamw3']" in capsys.readouterr().err


def test_char_data_batches_are_shifted_windows_of_the_text():
    data = demo.CharData.from_pydoc_topics()
    assert len(data.vocab) == len(set(data.vocab)) and data.train.max() < len(data.vocab)
    inputs, targets = data.batch(data.train, 4, 16, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    again, _ = data.batch(data.train, 4, 16, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(inputs, again)


def _step_time_module():
    if "step_time" not in sys.modules:  # dataclasses resolve annotations through sys.modules
        spec = importlib.util.spec_from_file_location("step_time", REPO / "benchmarks" / "step_time.py")
        sys.modules["step_time"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["step_time"])
    return sys.modules["step_time"]


def test_gpt2_parameter_list_is_gpt2_124m():
    shapes = _step_time_module().gpt2_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808


def test_state_bytes_count_shared_storage_once():
    step_time = _step_time_module()
    codebook = torch.randn(256)
    state = [torch.zeros(10, dtype=torch.uint8), codebook, codebook[:16], torch.zeros(3)]
    assert step_time.tensor_bytes(state, set()) == 10 + 256 * 4 + 3 * 4


def test_step_time_cpu_smoke_writes_reports(tmp_path, keep_torch_threads):
    step_time = _step_time_module()
    rows = step_time.main(["--cpu-smoke", "--out", str(tmp_path), "--workloads", "GPT-2",
                           "--optimizers", "torch AdamW,lowbit AdamW 8-bit,bitsandbytes", "--target-s", "0",
                           "--min-reps", "2"])
    by_name = {r.optimizer: r for r in rows}
    assert by_name["bitsandbytes AdamW8bit"].status == "skipped: needs CUDA"
    for name in ("torch AdamW fused", "lowbit AdamW 8-bit"):
        row = by_name[name]
        assert row.status == "ok", (name, row.status, row.error_trace)
        assert row.ms_median > 0 and row.ms_back_to_back > 0 and row.ratio_to_floor > 0
        assert row.update_rel_err_first < 0.1 and row.update_rel_err_last < 1e-4, name  # last tensor: fp32 state
    ours, torch_fused = by_name["lowbit AdamW 8-bit"], by_name["torch AdamW fused"]
    assert ours.state_bytes_per_param < 0.5 * torch_fused.state_bytes_per_param
    saved = json.loads((tmp_path / "step_time.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert "| lowbit AdamW 8-bit |" in (tmp_path / "step_time.md").read_text()
    assert (tmp_path / "step_time.png").read_bytes()[:4] == b"\x89PNG"


def test_fused_ablation_cpu_smoke_times_every_stand_in(tmp_path):
    from benchmarks import fused_ablation
    rows = fused_ablation.main(["--cpu-smoke", "--bits", "8", "--shapes", "1024x4x1", "--out", str(tmp_path)])
    eight_bit = [v for v in fused_ablation._STAND_INS if v not in fused_ablation._FOUR_BIT_ONLY]
    assert [r["variant"] for r in rows] == eight_bit
    # 1000 elements per tensor: two 8-bit states of 4 whole 256-blocks (1024 code bytes + 4 fp32 scales) each,
    # read and written, on top of 12 bytes of param and grad traffic per element.
    moved = 12 + 2 * 2 * (1024 + 4 * 4) / 1000
    assert all(r["ms"] > 0 and r["moved_bytes_per_param"] == pytest.approx(moved) for r in rows), rows
    assert "| 8 | trivall | 1024x4x1 |" in (tmp_path / "fused_ablation.md").read_text()
