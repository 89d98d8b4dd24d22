"""What training computes in (``--train-precision``, ``TrainConfig.precision``): fp32 as
every stored checkpoint was trained, bf16 autocast, or TF32 matmuls on CUDA."""
from __future__ import annotations

import contextlib

import torch

from bench.errors import BenchError

TRAIN_PRECISIONS = ("fp32", "tf32", "bf16")


def check_train_precision(precision: str, device: str) -> None:
    """A one-line error unless training can run at ``precision`` on ``device``'s kind."""
    if precision not in TRAIN_PRECISIONS:
        raise BenchError(f"--train-precision {precision!r}: expected one of {', '.join(TRAIN_PRECISIONS)} "
                         "(fp16 training would need loss scaling; use bf16)")
    kind = torch.device(device).type
    if precision == "tf32" and kind != "cuda":
        raise BenchError(f"--train-precision tf32 needs a CUDA device; on {kind} use fp32 or bf16")


@contextlib.contextmanager
def train_precision(precision: str, device: str):
    """Around the whole training loop: TF32 matmuls and convolutions on CUDA for tf32 and
    bf16 (what autocast leaves in fp32 runs in TF32), the flags restored after; fp32
    changes nothing, so its numerics stay those of every stored checkpoint."""
    cuda = torch.device(device).type == "cuda"
    if precision == "fp32" or not cuda:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(precision: str, device: str):
    """The forward and loss of one step: bf16 autocast (weights, gradients and the
    optimizer stay fp32), else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
