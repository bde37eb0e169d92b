"""`oscqat train` / `oscqat eval` end to end on tiny data (scikit-learn's digits, bundled, 8x8): a short run learns
and writes a complete report, --resume continues identically, bad arguments give clear errors."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from oscqat.app.cli import main  # noqa: E402
from oscqat.app.data import read_idx  # noqa: E402

TINY = ["--dataset", "digits", "--batch-size", "64", "--threads", "1", "--calib-batches", "2", "--bn-batches", "4",
        "--quiet"]


@pytest.fixture(scope="module")
def fp_ckpt(tmp_path_factory):
    """A full-precision digits model shared by the tests (trained once by the first run that asks for it)."""
    return str(tmp_path_factory.mktemp("fp") / "fp.pt")


def test_one_epoch_learns_and_writes_complete_report(tmp_path, fp_ckpt, capsys):
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--fp-epochs", "3", "--fp-checkpoint", fp_ckpt, "--epochs", "1", "--w-bits", "4",
               "--a-bits", "4", "--method", "dampen+freeze", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    for k in ("fp_acc", "acc_pre_bn", "acc_post_bn", "osc_pct", "frozen_pct", "layers", "timings", "config",
              "versions", "plots", "epochs"):
        assert k in rep, k
    assert rep["acc_post_bn"] > 50 and rep["acc_pre_bn"] > 50, rep      # 10 classes: chance is 10%
    assert rep["fp_acc"] > 50
    assert 0 <= rep["osc_pct"] <= 100 and 0 <= rep["frozen_pct"] <= 100
    assert rep["config"]["weight_bits"] == 4 and rep["config"]["method"] == "dampen+freeze"
    assert len(rep["layers"]) > 5 and any(layer["depthwise"] for layer in rep["layers"])
    assert {"fp_train_s", "qat_s", "bn_reestimate_s", "total_s"} <= set(rep["timings"])
    assert {"torch", "oscqat", "python"} <= set(rep["versions"])
    assert set(rep["plots"]) == {"integer_traces", "grid_distance", "oscillation_history"}
    for p in rep["plots"].values():
        assert (out / p.rsplit("/", 1)[-1]).stat().st_size > 1000
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    for k in ("model", "config", "schedule", "opt_w", "opt_s", "lr_w", "rng", "epoch"):
        assert k in ck, k
    assert any(k.endswith("weight_quant.freq") for k in ck["model"])
    assert ck["schedule"]["step_count"] == rep["steps"] > 0
    capsys.readouterr()
    # `oscqat eval` reproduces the pre-BN accuracy exactly and re-estimates BN
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["acc_pre_bn"] == pytest.approx(rep["acc_pre_bn"])
    assert ev["acc_post_bn"] > 50


def test_resume_continues_identically(tmp_path, fp_ckpt):
    common = [*TINY, "--fp-epochs", "3", "--fp-checkpoint", fp_ckpt, "--subset", "320", "--test-subset", "200",
              "--epochs", "2",
              "--w-bits", "3", "--a-bits", "4", "--method", "dampen+freeze", "--warmup", "0", "--momentum", "0.2",
              "--freeze-start", "0.3", "--freeze-end", "0.1", "--damp-lambda", "0.05", "--seed", "3", "--no-plots"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--stop-after-epoch", "1"]) == 0
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "b" / "report.json").exists()
    assert main(["train", "--resume", str(tmp_path / "b" / "checkpoint.pt"), "--quiet"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
    assert a["schedule"] == b["schedule"]
    ra = json.loads((tmp_path / "a" / "report.json").read_text())
    rb = json.loads((tmp_path / "b" / "report.json").read_text())
    for k in ("acc_pre_bn", "acc_post_bn", "osc_pct", "frozen_pct"):
        assert ra[k] == rb[k], k


def _err(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"oscqat {argv[0]}: error: ")
    return err


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    base = ["train", "--quiet", "--out", str(tmp_path / "o")]
    assert "--w-bits must be in 2..8, got 9" in _err(capsys, [*base, "--w-bits", "9"])
    assert "--a-bits must be in 2..8" in _err(capsys, [*base, "--a-bits", "1"])
    assert "unknown model 'nosuchnet'" in _err(capsys, [*base, "--dataset", "digits", "--model", "nosuchnet",
                                                        "--threads", "1"])
    assert "does not exist" in _err(capsys, [*base, "--dataset", str(tmp_path / "missing_folder")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "missing train-images-idx3-ubyte" in _err(capsys, [*base, "--dataset", "fashion-mnist",
                                                              "--data-dir", str(empty)])
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (empty / name).write_bytes(b"this is not an idx file")
    assert "not an IDX file" in _err(capsys, [*base, "--dataset", "fashion-mnist", "--data-dir", str(empty)])
    (empty / "train-images-idx3-ubyte").unlink()
    (empty / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    assert "corrupt gzip" in _err(capsys, [*base, "--dataset", "fashion-mnist", "--data-dir", str(empty)])
    assert "does not exist" in _err(capsys, ["train", "--resume", str(tmp_path / "nope.pt")])
    assert "does not exist" in _err(capsys, ["eval", "--checkpoint", str(tmp_path / "nope.pt")])
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": {}}, bogus)
    assert "not an `oscqat train` checkpoint" in _err(capsys, ["eval", "--checkpoint", str(bogus)])
    with pytest.raises(SystemExit):
        main([*base, "--method", "nosuch"])


def test_idx_reader_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2, 3, 4) + arr.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "t").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "t")
