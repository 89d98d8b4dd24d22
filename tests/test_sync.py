"""Host-device synchronisations of the inference hot path, counted on the CPU.

Every way the encoder could read a tensor's value on the host (``item``, ``tolist``,
``cpu``, ``bool``/``int``/``float``, ``nonzero``, boolean-mask indexing) is wrapped and
counted during one forward: a pausing or exit decision may read once (the new row
count a gather needs), blocks never. The compute trace's one copy per forward
(``ComputeTrace.to_host``) is no copy on the CPU, so it does not show here."""
import pytest
import torch

from methods.early_exit import EarlyExitModel, EarlyExitPolicy
from methods.paumer import PaumerModel, PaumerPolicy

READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that collects the name of every host read made while the test runs it."""
    reads = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    def masked(name, original):  # x[mask] / x[mask] = v: a nonzero on the mask, hence a sync
        def wrapper(self, index, *rest):
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                reads.append(name)
            return original(self, index, *rest)
        return wrapper

    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, masked(name, getattr(torch.Tensor, name)))
    return reads


def _heads(model):
    torch.manual_seed(1)
    for head in getattr(model, model.heads_attr).heads:
        torch.nn.init.normal_(head[1].weight, std=0.5)  # confident on some tokens, unsure on others
    return model


@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_a_paumer_forward_reads_the_host_once_per_pausing_layer(small_model, host_reads, batching):
    model = _heads(PaumerModel(small_model, layers=[1, 2]).eval())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    policy = PaumerPolicy(model.pausing, tau=0.3, batching=batching)
    with torch.inference_mode():
        host_reads.clear()
        _, state = model.segmenter.forward_state(x, policy)
        reads = list(host_reads)
    counts = state.trace.tokens
    assert (counts != counts[:1]).any(dim=0).sum() >= 2  # a ragged batch: the packed/padded paths ran
    assert reads == ["tolist"] * 2  # one per pausing decision
    assert state.trace.tokens.device.type == "cpu"


def test_token_early_exit_reads_the_host_once_per_exit_layer(small_model, host_reads):
    model = _heads(EarlyExitModel(small_model, layers=[1, 2]).eval())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        host_reads.clear()
        _, state = model.segmenter.forward_state(x, EarlyExitPolicy(model.heads, threshold=0.5))
        reads = list(host_reads)
    assert state.any_left  # tokens exited, so the paint ran too
    assert reads == ["tolist"] * 2  # one per exit decision


@pytest.mark.parametrize("threshold", [0.3, 1.0])  # some images exit / none does
def test_image_early_exit_reads_the_host_once_per_exit_layer(small_model, host_reads, threshold):
    model = _heads(EarlyExitModel(small_model, layers=[1, 2]).eval())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    policy = EarlyExitPolicy(model.heads, threshold=threshold, mode="image")
    with torch.inference_mode():
        host_reads.clear()
        _, state = model.segmenter.forward_state(x, policy)
        reads = list(host_reads)
    exited = state.trace.decoded is not None and not state.trace.decoded.all()
    assert exited == (threshold < 1.0)  # the decoder skipped exited images (or ran for all)
    # at most one per exit decision (none once every image has exited): which images to
    # decode is known from those reads, no mask is read for it
    assert set(reads) <= {"tolist"} and 1 <= len(reads) <= 2


def _textured(n, size, seed=3):
    """Flat colour blocks with more or less noise per image: merges differ between images."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    flat = F.interpolate(torch.randn(n, 3, size // 8, size // 8, generator=g), size=(size, size), mode="nearest")
    noise = torch.linspace(0.0, 2.0, n)[:, None, None, None]
    return flat + noise * torch.randn(n, 3, size, size, generator=g)


@pytest.mark.parametrize("batching", ["pad", "packed", "reference"])
@pytest.mark.parametrize("class_token", [False, True])
def test_an_algm_forward_reads_the_host_once_per_merging_layer(host_reads, batching, class_token):
    from methods.algm import ALGMPolicy
    from methods.segmenter import build_model

    model = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, class_token=class_token).eval()
    policy = ALGMPolicy(model.depth, threshold=0.0, batching=batching)
    with torch.inference_mode():
        host_reads.clear()
        _, state = model.forward_state(_textured(4, 64), policy)
        reads = list(host_reads)
    counts = state.trace.tokens
    assert (counts[:, -1] < counts[:, 0]).all()  # every image merged
    if batching != "reference":  # a ragged batch from the local merge on: padded / packed blocks ran
        assert (counts[:, 1] != counts[:1, 1]).any() and (counts[:, -1] != counts[:1, -1]).any()
    assert reads == ["tolist"] * len(policy.layers)  # the rows each image keeps, once per merging layer


@pytest.mark.parametrize("class_token", [False, True])
def test_a_tome_forward_never_reads_the_host(host_reads, class_token):
    from methods.segmenter import build_model
    from methods.tome import ToMePolicy

    model = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32, class_token=class_token).eval()
    with torch.inference_mode():
        host_reads.clear()
        _, state = model.forward_state(_textured(3, 64), ToMePolicy(model.depth, r=6))
        reads = list(host_reads)
    assert state.trace.tokens[0].tolist() == [64, 58, 52, 46]
    assert reads == []
