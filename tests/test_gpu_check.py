"""tests/gpu/gpu_check.py, the GPU check script, on the CPU: its bf16 matmul share counts what
autocast really ran, and its deadline stops it cleanly. The GPU figures themselves need a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from featx.models import create_model

_PATH = Path(__file__).parent / "gpu" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _step(model, x, lengths, bf16: bool):
    """One supervised training step as featx.train_loop takes it, CPU autocast standing in for
    CUDA's."""
    from featx.train_loop import supervised_loss

    labels = torch.tensor([0, 1, 2, 0])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = supervised_loss(0.0)(model, x, lengths, labels, True)[0]
        loss.backward()

    return step


# the CNN's masked batch norm needs CUDA autocast's fp32 sums, so its text model is left out
CASES = {
    "cnn-image": ("cnn", "image", lambda: (torch.randn(4, 3, 32, 32), None)),
    "rnn-text": (
        "rnn",
        "text",
        lambda: (torch.randint(1, 50, (4, 12)), torch.tensor([12, 8, 5, 3])),
    ),
    "attention-text": (
        "attention",
        "text",
        lambda: (torch.randint(1, 50, (4, 12)), torch.tensor([12, 8, 5, 3])),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_bf16_matmul_share_counts_what_autocast_ran(gpu_check, case):
    family, modality, inputs = CASES[case]
    torch.manual_seed(0)
    model = create_model(family, modality=modality, num_classes=3, vocab_size=50)
    model.train()
    x, lengths = inputs()
    bf16 = gpu_check.matmul_flops_by_dtype(_step(model, x, lengths, bf16=True))
    fp32 = gpu_check.matmul_flops_by_dtype(_step(model, x, lengths, bf16=False))
    assert gpu_check.bf16_share(bf16) == 1.0 and gpu_check.bf16_share(fp32) == 0.0
    assert set(fp32) == {"fp32"} and sum(bf16.values()) == sum(fp32.values()) > 0


def test_the_count_agrees_with_torchs_flop_counter_and_adds_cpu_attention(gpu_check):
    """Where torch's FlopCounterMode knows every op (the CNN), the totals agree; attention on
    the CPU runs a flash kernel it does not count, and gpu_check does."""
    from torch.utils.flop_counter import FlopCounterMode

    for family, modality, more in (("cnn", "image", False), ("attention", "text", True)):
        _, _, inputs = CASES[f"{family}-{modality}"]
        model = create_model(family, modality=modality, num_classes=3, vocab_size=50)
        x, lengths = inputs()
        counted = sum(gpu_check.matmul_flops_by_dtype(_step(model, x, lengths, False)).values())
        with FlopCounterMode(display=False) as torch_count:
            _step(model, x, lengths, False)()
        assert (
            (counted > torch_count.get_total_flops())
            if more
            else (counted == torch_count.get_total_flops())
        )


def test_the_cudnn_rnn_formula_counts_every_weight_per_token(gpu_check):
    """cuDNN's fused RNN (the rnn family on a GPU) is not in torch's formulas: 2 FLOPs per
    weight per token, per layer and direction; backward twice that."""
    aten = torch.ops.aten
    table = gpu_check._formulas()
    h, d, tokens = 8, 5, 7
    weights = [torch.empty(4 * h, d), torch.empty(4 * h, h), torch.empty(4 * h), torch.empty(4 * h)]
    args = [torch.empty(tokens, d), weights, *[None] * 12, [3, 2, 2], None]  # packed, 7 tokens
    per_token = 2 * (4 * h * d + 4 * h * h)
    assert table[aten._cudnn_rnn](*args) == per_token * tokens
    back = [torch.empty(1, tokens, d), weights, *[None] * 16, [], None, None, None]  # (1, 7, d)
    assert table[aten._cudnn_rnn_backward](*back) == 2 * per_token * tokens


def test_the_deadline_skips_what_no_longer_fits_and_still_reports(gpu_check, tmp_path, capsys):
    assert gpu_check.fits(100, []) and gpu_check.fits(100, [50, 80])
    assert not gpu_check.fits(90, [50, 80]) and not gpu_check.fits(0, [])
    assert gpu_check.main(["--cpu", "--budget-s", "0.01", "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["device"] == "cpu" and lines[-1]["summary"]
    assert lines[-1]["done"] == [] and len(lines[-1]["skipped"]) == 9
    assert lines[-1]["skipped"][:3] == ["images:cnn", "text:attention", "audio:rnn"]
