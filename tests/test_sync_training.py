"""Host reads of a training step of every method that trains, and of the inference
forward of every registered method, counted on the CPU (``bench.opcount``'s list of
Tensor reads; on a GPU each would wait for the queue to drain).

A training step's reads are counted from its forward to the end of its optimizer step,
data loading excluded (CPU tensors by nature) and the optimizer's own reads too (AdamW
reads its step counters, CPU tensors unless ``capturable``). The loop reads its summed
loss at a log line, before a checkpoint and at the end only (``TrainingLog``)."""
import pytest
import torch

from bench import train as train_module
from bench.opcount import count_host_reads
from bench.train import StepBatches, TrainConfig
from methods import METHODS
from methods.segmenter import build_model

SMALL = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 32}
STEPS, LOG_EVERY = 4, 2
# reads a method's loss makes per step on top of the loop's: DToP's present classes (one
# nonzero per step, shared by its heads); algm-ft trains with real merges, whose shapes
# the host must know: at most one per merging layer (ALGM's inference path)
LOSS_READS = {"dtop": 1, "algm-ft": 2}


class Reads:
    """Host reads per training step; paused while the optimizer steps."""

    def __init__(self):
        self.steps: list[int] = []
        self.paused = True


def _counting(monkeypatch, reads: Reads):
    from bench import opcount

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if not reads.paused:
                reads.steps[-1] += 1
            return original(self, *args, **kwargs)
        return wrapper

    def masked(name, original):
        def wrapper(self, index, *rest):
            if not reads.paused and isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                reads.steps[-1] += 1
            return original(self, index, *rest)
        return wrapper

    for name in opcount.HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, masked(name, getattr(torch.Tensor, name)))


def _trainable(name: str):
    torch.manual_seed(0)
    seg = build_model(3, "tiny", **SMALL)
    spec = METHODS[name]
    if spec.fine_tune is None:
        return seg, train_module.default_loss
    knobs = dict(spec.fine_tune.knobs, **({"depth": 2} if name == "shallow" else {}))
    model = spec.fine_tune.build(seg, **knobs)
    return model, lambda m, images, labels: spec.fine_tune.loss(m, images, labels, **knobs)


@pytest.mark.parametrize("name", ["baseline", "baseline-ft", "shallow", "paumer", "early-exit", "algm-ft", "dtop"])
def test_a_training_step_reads_the_host_at_most_once(name, toy_dataset, monkeypatch, tmp_path):
    model, loss = _trainable(name)
    cfg = TrainConfig(dataset="toy", num_classes=3, steps=STEPS, batch_size=4, warmup_steps=1, crop_size=32,
                      model_overrides=SMALL, method=name)
    batches = [StepBatches(toy_dataset, cfg)[s] for s in range(STEPS)]  # data loading: not counted
    monkeypatch.setattr(train_module, "step_loader", lambda *a, **k: batches)
    reads = Reads()
    _counting(monkeypatch, reads)

    def counted_loss(m, images, labels):  # a step starts at its forward
        reads.steps.append(0)
        reads.paused = False
        return loss(m, images, labels)

    def stop(original):
        def wrapper(*args, **kwargs):
            reads.paused = True
            return original(*args, **kwargs)
        return wrapper

    optimizer_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        setattr(reads, "paused", True), optimizer_step(self, *a, **k), setattr(reads, "paused", False))[1])
    monkeypatch.setattr(train_module, "weights_hash", stop(train_module.weights_hash))  # the final checkpoint
    train_module.train(model, toy_dataset, cfg, tmp_path / "x.pt", loss_fn=counted_loss, progress=False,
                       log_every=LOG_EVERY, checkpoint_every=100)
    assert len(reads.steps) == STEPS
    budget = LOSS_READS.get(name, 0)
    for step, count in enumerate(reads.steps, 1):
        loop = 1 if step % LOG_EVERY == 0 or step == STEPS else 0  # the summed loss, at a line / the end
        assert count <= budget + loop, (step, reads.steps)
    if name not in LOSS_READS:
        assert max(reads.steps) <= 1  # the target: one read per step at most


def test_the_training_forward_leaves_its_trace_on_the_device(monkeypatch, toy_dataset):
    """On a GPU the trace's host copy (``ComputeTrace.to_host``) would be a read per step;
    the CPU counter cannot see it, so the test counts the calls."""
    from methods.encoder import ComputeTrace

    calls = []
    original = ComputeTrace.to_host
    monkeypatch.setattr(ComputeTrace, "to_host", lambda self: (calls.append(1), original(self))[1])
    images, labels = toy_dataset[0][0][None].float(), toy_dataset[0][1][None]
    for name in ("baseline", "paumer", "early-exit", "dtop"):
        model, loss = _trainable(name)
        loss(model.train(), images / 255, labels).backward()
    assert calls == []


def _heads(model):
    torch.manual_seed(1)
    heads = getattr(model, getattr(model, "heads_attr", "heads"), None)
    for head in getattr(heads, "heads", []):
        if isinstance(head, torch.nn.Sequential):
            torch.nn.init.normal_(head[1].weight, std=0.5)  # confident on some tokens, unsure on others
    return model


# (method, knobs, decision or merging layers of the small model: the read budget)
FORWARDS = [
    ("baseline", {}, 0),
    ("static", {"scale": 0.5}, 0),
    ("shallow", {"depth": 2}, 0),
    ("paumer", {"tau": 0.3}, 3),
    ("paumer", {"tau": 0.3, "batching": "packed"}, 3),
    ("early-exit", {"mode": "token", "threshold": 0.9}, 3),
    ("early-exit", {"mode": "image", "threshold": 0.8}, 3),
    ("tome", {"r": 2}, 4),
    ("algm", {"threshold": 0.5}, 2),
    ("algm", {"threshold": 0.5, "batching": "packed"}, 2),
    ("algm-ft", {"threshold": 0.5}, 2),
    ("dtop", {"threshold": 0.05}, 2),
]


@pytest.mark.parametrize("name,knobs,layers", FORWARDS, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_an_inference_forward_reads_the_host_at_most_once_per_decision_layer(name, knobs, layers):
    spec = METHODS[name]
    torch.manual_seed(0)
    seg = build_model(3, "tiny", **SMALL)
    model = seg
    if spec.fine_tune is not None:
        model = spec.fine_tune.build(seg, **{k: v for k, v in knobs.items() if k in spec.fine_tune.op_knobs})
    model = _heads(model).eval()
    policy = spec.make_policy(model, **knobs)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    segmenter = getattr(model, "segmenter", model)
    with torch.inference_mode(), count_host_reads() as reads:
        segmenter.forward_state(x, policy)
    assert len(reads) <= layers, reads
    if layers == 0:
        assert reads == []
