import time

import pytest
import torch
from torch import nn

from bench import timing
from bench.errors import BenchError
from bench.protocol import EvalSettings, evaluate, predict, window_starts
from bench.timing import speed_entry, time_methods
from methods.encoder import Policy, TokenState


class PixelModel(nn.Module):
    """A pixel-local 'segmenter' (1x1 conv): its prediction cannot depend on context, so
    any correct window stitching must reproduce the whole-image prediction."""

    patch_size = 1
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward_state(self, x, policy):
        B, _, H, W = x.shape
        state = TokenState(x.new_zeros(B, H * W, 1), (H, W), depth=1)
        state.trace.tokens[:] = H * W
        return self.conv(x), state


def test_window_starts_cover_the_image_and_end_at_the_border():
    assert window_starts(1024, 768, 512) == [0, 256]
    assert window_starts(2048, 768, 512) == [0, 512, 1024, 1280]
    assert window_starts(500, 768, 512) == [0]


def test_tiling_windows_equal_whole_image():
    model = PixelModel().eval()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    whole = predict(model, Policy(), images, EvalSettings("whole"))
    for window, stride in [(32, 32), (48, 16), (40, 24)]:
        slid = predict(model, Policy(), images, EvalSettings("slide", window, stride, batch_size=3))
        assert torch.allclose(slid.logits, whole.logits, atol=1e-5), (window, stride)


def test_segmenter_windows_equal_whole_when_one_window_is_the_image(small_model):
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        whole = predict(small_model, Policy(), images, EvalSettings("whole"))
        slid = predict(small_model, Policy(), images, EvalSettings("slide", 32, 16))
    assert torch.allclose(slid.logits, whole.logits, atol=1e-5)


def test_scaled_input_comes_back_at_label_resolution(small_model):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        pred = predict(small_model, Policy(), images, EvalSettings("whole"), scale=0.5)
    assert pred.logits.shape == (2, 5, 64, 64)
    assert pred.tokens.tolist() == [[16] * 4] * 2  # 32x32 input, 8x8 patches


def test_evaluate_reports_miou_flops_and_tokens(small_model, toy_dataset):
    from bench.flops import FlopModel

    policy = Policy()
    out = evaluate(small_model, policy, toy_dataset, EvalSettings("whole", batch_size=4),
                   FlopModel(small_model, policy), num_classes=5, limit=6)
    assert out["images"] == 6
    assert 0.0 <= out["miou"] <= 1.0
    assert out["tokens_per_block"] == [1.0] * 4
    assert out["gflops"]["min"] == out["gflops"]["max"] > 0  # a static model: same cost per image


def test_time_methods_measures_every_run(small_model):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    runs = {"a": (small_model, Policy(), 1.0), "b": (small_model, Policy(), 0.5)}
    out = time_methods(runs, images, EvalSettings("whole"), batch_size=1, warmup=0, repeats=2)
    assert set(out) == {"a", "b"}
    assert out["a"]["throughput"] > 0 and out["a"]["latency_ms"]["p90"] >= out["a"]["latency_ms"]["p50"]


def test_time_methods_stores_the_spread_over_repeats(small_model):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = time_methods({"a": (small_model, Policy(), 1.0)}, images, EvalSettings("whole"), batch_size=2,
                       warmup=0, repeats=3)["a"]
    low, high = out["throughput_range"]
    assert len(out["repeats"]) == 3 and [low, high] == [min(out["repeats"]), max(out["repeats"])]
    assert low <= out["throughput_iqr"][0] <= out["throughput"] <= out["throughput_iqr"][1] <= high


def test_speedup_spread_is_over_ratios_of_the_same_repeat():
    # the op is 2x the baseline in every repeat while the machine's speed drifts 1..3x:
    # ratios of the same repeat are all 2, not spread by the drift
    timed = {"baseline": {"throughput": 20.0, "repeats": [10.0, 20.0, 30.0]},
             "op0": {"throughput": 40.0, "throughput_iqr": [30.0, 50.0], "repeats": [20.0, 40.0, 60.0]}}
    entry = speed_entry(timed, "op0")
    assert entry["speedup"] == 2.0 and entry["speedup_iqr"] == [2.0, 2.0] and entry["speedup_range"] == [2.0, 2.0]
    assert entry["baseline_throughput"] == 20.0 and "repeats" not in entry
    timed["op0"]["repeats"] = [10.0, 40.0, 90.0]  # ratios 1, 2, 3
    entry = speed_entry(timed, "op0")
    assert entry["speedup_range"] == [1.0, 3.0] and entry["speedup_iqr"] == [1.5, 2.5]


def test_timing_synchronises_the_device_it_runs_on(monkeypatch):
    from bench import timing

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    timing._sync("cuda:1")
    timing._sync("cpu")
    assert calls == [torch.device("cuda:1")]  # not the current device (cuda:0)


class Logging(Policy):
    """The full model; logs its name each time a forward starts."""

    def __init__(self, name, log):
        self.run_name, self.log = name, log

    def start(self, model, state):
        self.log.append(self.run_name)


def test_timing_interleaves_methods_repeat_by_repeat_and_synchronises_before_reading_the_clock(
        small_model, monkeypatch):
    log = []
    clock = time.perf_counter
    monkeypatch.setattr(timing, "_sync", lambda *args, **kwargs: log.append("sync"))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: log.append("clock") or clock())
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    runs = {name: (small_model, Logging(name, log), 1.0) for name in ("a", "b")}
    time_methods(runs, images, EvalSettings("whole"), batch_size=2, warmup=1, repeats=2)
    monkeypatch.undo()

    def one_pass(name):  # idle device, clock; each of the 2 forwards ends in a sync before the clock
        return ["sync", "clock"] + ["clock", name, "sync"] * 2 + ["clock"]

    # first one untimed forward each (its ops and host reads, bench.opcount), then a, b in
    # every repeat (1 warm-up + 2)
    assert log == ["a", "b"] + (one_pass("a") + one_pass("b")) * 3


class NeedsLabels(Policy):
    """Like the oracle criterion: needs the labels of the images it segments."""

    needs_labels = True

    def __init__(self):
        self.pixel_labels, self.seen = None, []

    def start(self, model, state):
        assert self.pixel_labels.shape[0] == state.batch_size
        self.seen.append(self.pixel_labels.clone())


@pytest.mark.parametrize("sizes", [[32, 32, 32, 32], [32, 32, 48, 48, 48]])
def test_timing_gives_a_labelled_policy_the_labels_of_the_images_it_times(small_model, sizes):
    images = [torch.full((3, 32, w), i, dtype=torch.uint8) for i, w in enumerate(sizes)]
    labels = [torch.full((32, w), i) for i, w in enumerate(sizes)]
    if len(set(sizes)) == 1:
        images, labels = torch.stack(images), torch.stack(labels)
    policy = NeedsLabels()
    runs = {"oracle": (small_model, policy, 1.0), "baseline": (small_model, Policy(), 1.0)}
    time_methods(runs, images, EvalSettings("whole"), batch_size=2, warmup=1, repeats=1, labels=labels)
    chunks = [[0, 1], [2, 3]] if len(set(sizes)) == 1 else [[0, 1], [2, 3], [4]]
    expected = [torch.stack([torch.full((32, sizes[i]), i) for i in chunk]) for chunk in chunks] * 2
    expected = expected[:1] + expected  # the untimed forward that counts ops: the first chunk's labels
    assert len(policy.seen) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(policy.seen, expected))
    with pytest.raises(BenchError, match="oracle needs the timing images' labels"):
        time_methods(runs, images, EvalSettings("whole"), batch_size=2, warmup=0, repeats=1)


# ------------------------------------------- sliding windows batched across images

class SizedList(list):
    """A dataset of (image, label) pairs of several sizes (ADE20K-like)."""


def mixed_sizes(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(48, 64), (48, 64), (40, 72), (64, 40), (48, 64)][:n]
    return SizedList((torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                      torch.randint(0, 5, (h, w), generator=g)) for h, w in sizes)


def test_windows_of_several_images_share_forwards_and_equal_one_image_at_a_time(small_model):
    from bench.protocol import predict_windows

    data = mixed_sizes()
    settings = EvalSettings("slide", 32, 16, batch_size=8)
    batches = [image[None] for image, _ in data]
    with torch.inference_mode():
        preds, forwards = predict_windows(small_model, Policy(), batches, settings)
        alone = [predict(small_model, Policy(), b, settings) for b in batches]
    windows = sum(len(window_starts(h, 32, 16)) * len(window_starts(w, 32, 16)) for h, w in
                  (b.shape[-2:] for b in batches))
    assert sum(forwards) == windows and forwards[:-1] == [8] * (len(forwards) - 1)  # 8 windows a forward
    assert len(forwards) < sum(len(a.forwards) for a in alone)  # fewer forwards than per image
    for p, a in zip(preds, alone):
        assert p.logits.shape == a.logits.shape
        assert torch.allclose(p.logits, a.logits, atol=1e-4)
        assert torch.equal(p.tokens, a.tokens) and torch.equal(p.full_tokens, a.full_tokens)


def test_evaluate_batches_windows_across_images_and_says_so(small_model):
    from bench.flops import FlopModel

    data = mixed_sizes()
    results = {}
    for bs in (1, 8):
        settings = EvalSettings("slide", 32, 16, batch_size=bs)
        results[bs] = evaluate(small_model, Policy(), data, settings, FlopModel(small_model), num_classes=5)
    assert results[1]["forward_batch"]["max"] == 1
    assert results[8]["forward_batch"]["max"] == 8 and results[8]["forward_batch"]["mean"] > 4
    assert results[8]["forward_batch"]["forwards"] < results[1]["forward_batch"]["forwards"] / 4
    assert results[8]["miou"] == pytest.approx(results[1]["miou"], abs=1e-6)
    assert results[8]["gflops"] == results[1]["gflops"]


def test_timing_sliding_windows_over_images_of_several_sizes_records_the_batch(small_model):
    images = [image for image, _ in mixed_sizes()]
    runs = {"baseline": (small_model, Policy(), 1.0)}
    out = time_methods(runs, images, EvalSettings("slide", 32, 16), batch_size=8, warmup=0, repeats=1)
    assert out["baseline"]["forward_batch"]["max"] == 8 and out["baseline"]["throughput"] > 0
