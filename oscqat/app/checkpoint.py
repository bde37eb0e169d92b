"""The application's two checkpoint formats: the full-precision starting point (written by the one FP trainer,
`fp_stage.train_fp`, for `oscqat train --fp-checkpoint` and bench/train_fp.py; read by both and by
bench/experiments.py), and the resumable QAT run (`oscqat train --out DIR`'s checkpoint.pt; read by --resume,
`oscqat eval` and `oscqat export`).

Full-precision checkpoint: a dict saved with torch.save. Required keys (FP_REQUIRED): "model" (the state_dict of
models.build_model(model_name, num_classes, in_channels)), "model_name", "num_classes", "in_channels", "dataset"
(its name, e.g. 'fashion-mnist'), "fp_acc" (test accuracy in %, measured with the BatchNorm statistics as saved),
"test_size" (the test images it was measured on), "bn" (how those statistics were made). Optional, checked when
present: "image_size" ([H, W]). Written besides and kept as they are: "fp_acc_running_bn", "steps", "fp_epochs",
"epochs_planned", "seed", "command", "init_command", "recipe", "train_log", "dataset_info". The committed
checkpoints (oscqat/app/checkpoints/) are files of this format as bench/train_fp.py wrote them before it became a
front end of fp_stage; no key carries a version, since the required keys are the format."""
from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
CKPT_FORMAT = 1
FP_REQUIRED = {"model": dict, "model_name": str, "num_classes": int, "in_channels": int, "dataset": str,
               "fp_acc": (int, float), "test_size": int, "bn": str}


def fp_problems(ck) -> list[str]:
    """What keeps `ck` from being a full-precision checkpoint (empty: it is one)."""
    if not isinstance(ck, dict):
        return [f"it holds a {type(ck).__name__}, not the checkpoint dict"]
    why = [f"no {k!r}" for k in FP_REQUIRED if k not in ck]
    why += [f"{k!r} is a {type(ck[k]).__name__}" for k, t in FP_REQUIRED.items()
            if k in ck and (not isinstance(ck[k], t) or isinstance(ck[k], bool))]
    size = ck.get("image_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2):
        why.append(f"'image_size' is {size!r}, not [H, W]")
    return why


def load_fp(path, what: str = "full-precision checkpoint") -> dict:
    """The full-precision checkpoint at `path`, validated (FP_REQUIRED); errors name `what` and the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise RuntimeError(f"{what} {path}: cannot read it: {str(e).splitlines()[0]}") from e
    why = fp_problems(ck)
    if why:
        raise ValueError(f"{what} {path} is not a full-precision checkpoint ({'; '.join(why)}); "
                         f"bench/train_fp.py and `oscqat train --fp-checkpoint FILE` write them")
    return ck


def fp_mismatch(ck: dict, ds) -> list[str]:
    """Why the checkpoint's model does not fit the dataset `ds` (empty: it does)."""
    wrong = []
    if ck["dataset"] != ds.name:
        wrong.append(f"it was trained on {ck['dataset']}, this run uses {ds.name}")
    size = ck.get("image_size")
    if size is not None and list(size) != list(ds.image_size):
        wrong.append(f"its images are {size[0]}x{size[1]}, this run's {ds.image_size[0]}x{ds.image_size[1]}")
    return wrong


def save_fp(path, ck: dict) -> None:
    """Write a full-precision checkpoint; a reader never sees a half-written file."""
    why = fp_problems(ck)
    if why:
        raise ValueError(f"not a full-precision checkpoint: {'; '.join(why)}")
    _save(path, ck)


def save_checkpoint(path, state: dict) -> None:
    """Write a QAT run checkpoint (`Trainer.state()`); a reader, or a resume after a kill, never sees a
    half-written file."""
    _save(path, state)


def _save(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """The QAT run checkpoint at `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; expected the {CHECKPOINT} written by "
                                f"`oscqat train --out DIR`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise RuntimeError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}; expected the {CHECKPOINT} "
                           f"written by `oscqat train`") from e
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "config" not in ck:
        raise ValueError(f"{path} is not an `oscqat train` checkpoint (a full-precision --fp-checkpoint file "
                         f"cannot be resumed or evaluated; pass the {CHECKPOINT} from the QAT --out folder)")
    return ck
