"""Every registered method runs at every CPU precision: fp32 and bf16 (fp16 needs CUDA,
``protocol.check_execution``), on a small model with and without a class token, on a
batch whose images keep different token counts. bf16 logits come back in fp32, finite,
and close to fp32's for the methods that take no decisions (merges and pauses may differ
in bf16)."""
import pytest
import torch

from bench.cli import main
from bench.protocol import EvalSettings, predict
from bench.results import ResultsStore
from methods import all_methods
from methods.encoder import Policy
from tests.test_cli import toy  # noqa: F401 - a fixture

PRECISIONS = ["fp32", "bf16"]


def _operating_points():
    """(method, knobs) for every registered method: a point of its sweep that cuts
    compute (the middle one), plus image-mode early exit."""
    points = []
    for name, spec in sorted(all_methods().items()):
        sweep = spec.sweep(4, 16)
        points.append((name, sweep[len(sweep) // 2]))
    points.append(("early-exit", {"mode": "image", "threshold": 0.3}))
    return points


def _policy(name, knobs, segmenter):
    """The method's policy at ``knobs`` on its trainable module built around ``segmenter``
    (random heads made confident on some tokens so that decisions happen)."""
    spec = all_methods()[name]
    trained = segmenter
    if spec.fine_tune is not None:
        build_knobs = {**spec.fine_tune.knobs, **{k: knobs[k] for k in spec.fine_tune.op_knobs if k in knobs}}
        trained = spec.fine_tune.build(segmenter, **build_knobs)
    torch.manual_seed(1)
    for module in trained.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == segmenter.num_classes:
            torch.nn.init.normal_(module.weight, std=0.5)
    trained.eval()
    return getattr(trained, "segmenter", trained), spec.make_policy(trained, **knobs), spec.input_scale(knobs)


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("name,knobs", _operating_points(), ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_every_method_runs_at_every_cpu_precision(name, knobs, class_token):
    from methods.segmenter import build_model

    segmenter = build_model(5, "tiny", depth=4, embed_dim=64, num_heads=2, img_size=32,
                            class_token=class_token).eval()
    model, policy, scale = _policy(name, knobs, segmenter)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    out = {}
    with torch.inference_mode():
        for precision in PRECISIONS:
            out[precision] = predict(model, policy, x, EvalSettings(batch_size=3, precision=precision), scale=scale)
    for precision, pred in out.items():
        assert pred.logits.dtype == torch.float32, precision
        assert pred.logits.shape == (3, 5, 32, 32)
        assert torch.isfinite(pred.logits).all(), precision
    if type(policy) is Policy:  # no decisions (which bf16 may take differently): close logits
        torch.testing.assert_close(out["bf16"].logits, out["fp32"].logits, atol=0.25, rtol=0.1)


def test_image_early_exit_runs_at_bf16_through_bench_run(tmp_path, toy):  # noqa: F811
    main(["run", "--method", "early-exit", "--op", "mode=image threshold=0.85", "--precision", "bf16",
          "--dataset", "toy", "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res"),
          "--quiet", "--timing-images", "2", "--repeats", "1", "--steps", "2"])
    records = ResultsStore(tmp_path / "res").load()
    assert [(r["method"], r["precision"]) for r in records] == [("early-exit", "bf16")]
