"""What training computes in (``--train-precision``, ``TrainConfig.precision``): fp32 as
every stored checkpoint was trained, bf16 autocast, or TF32 matmuls on CUDA; and
whether it may use nondeterministic kernels (``--deterministic``)."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

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


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: str):
    """``--deterministic``, around the whole training loop: torch's deterministic
    algorithms only (``torch.use_deterministic_algorithms``; cuDNN deterministic, no
    benchmarking; on CUDA cuBLAS's fixed workspaces, ``CUBLAS_WORKSPACE_CONFIG``, unless
    already set, which cuBLAS reads before its first use), the settings restored after.
    An op with no deterministic kernel on the device ends training with a one-line error
    naming it (torch raises rather than run it nondeterministically: ``nondeterministic_op``).
    On the CPU every
    kernel training uses is deterministic already: the flag changes nothing there."""
    if not enabled:
        yield
        return
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def nondeterministic_op(e: RuntimeError) -> Optional[BenchError]:
    """The one-line error for torch's refusal of an op without a deterministic kernel
    under ``--deterministic``, or None for any other error."""
    text = str(e).strip()
    if "does not have a deterministic implementation" not in text:
        return None
    first = text.splitlines()[0].split(", but you set")[0]
    return BenchError(f"--deterministic: {first} on this device; train without --deterministic "
                      "(its records then say deterministic: false)")
