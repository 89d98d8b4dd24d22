"""The kernel budget of one forward: aten ops dispatched, host reads, peak GPU memory.

On a GPU every dispatched aten op is (about) one kernel launch of 5-10 us of host time,
and every read of a device value on the host (``item``, ``tolist``, ``cpu``, ``bool``,
``nonzero``, boolean-mask indexing) waits for the queue to drain. A method that saves
FLOPs but dispatches twice the ops, or syncs per block, can lose its saving there.
``forward_counts`` measures both for one untimed forward, in eager mode (compiled
graphs fuse ops, so eager counts are the comparable budget); ``time_methods`` stores
them with every timing entry: ``ops_per_forward`` (ops that launch work: views and
no-op conversions excluded), ``dispatched_ops_per_forward`` (every aten op) and
``host_syncs_per_forward``.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

# Tensor methods through which Python code reads a device value on the host
HOST_READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _storages(value) -> set:
    """Data pointers of the memory the tensors in ``value`` hold. A jagged nested tensor
    (a tensor subclass with no storage of its own) holds its components' (values,
    offsets): an op on it that returns a view of its values launches nothing. An empty
    tensor holds none (a nested tensor's cached min/max lengths are (0, n) tensors)."""
    out = set()
    for t in tree_leaves(value):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or (not t.is_nested and t.numel() == 0):
            continue
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            out |= _storages([getattr(t, name) for name in names])
        else:
            out.add(t.untyped_storage().data_ptr())
    return out


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active: ``dispatched``, every op, and
    ``ops``, those that launch work: an op that writes in place or returns memory none
    of its inputs holds. Views, reshapes that are views, ``to`` a dtype the tensor
    already has and dropout in eval return their input's memory: no kernel, not counted
    in ``ops``."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.dispatched = 0
        self.by_name: dict[str, int] = {}  # launching ops by name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.dispatched += 1
        if func._schema.is_mutable or not _storages(out) <= _storages((args, kwargs)):
            self.ops += 1
            name = func.overloadpacket.__name__
            self.by_name[name] = self.by_name.get(name, 0) + 1
        return out


@contextlib.contextmanager
def count_host_reads():
    """Yields a list that collects the name of every host read of a tensor value made
    while active (the ``torch.Tensor`` methods of ``HOST_READS``, and indexing with a
    boolean mask, which reads the mask's nonzero count). On the CPU these are no real
    syncs, but each would be one on a GPU: the count is the GPU's."""
    reads: list[str] = []
    saved = {}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    def masked(name, original):
        def wrapper(self, index, *rest):
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                reads.append(name)
            return original(self, index, *rest)
        return wrapper

    for wrap, names in ((counting, HOST_READS), (masked, ("__getitem__", "__setitem__"))):
        for name in names:
            saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from the C base class
            setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield reads
    finally:
        # as it was: an inherited method is deleted again, not pinned on torch.Tensor (a
        # pinned C slot changes how the JIT tracer, fvcore's, sees indexing and ints)
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def forward_counts(forward, device) -> dict:
    """Run ``forward()`` once under both counters (eager: the caller passes settings
    without compilation); returns {"ops_per_forward", "host_syncs_per_forward"} and, on
    CUDA, "peak_memory_mb" (the forward's peak allocated GPU memory)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = OpCounter()
    with count_host_reads() as reads, counter:
        forward()
    out = {"ops_per_forward": counter.ops, "dispatched_ops_per_forward": counter.dispatched,
           "host_syncs_per_forward": len(reads)}
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def parameter_count(*modules) -> int:
    """Parameters of the given modules (a model and its method's heads), each counted once."""
    seen = {id(p): p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()}
    return sum(seen.values())
