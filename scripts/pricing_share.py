"""What share of an IDD-Lite PAUMER evaluation is FLOP pricing: per-count fvcore tracing
(every (component, token count) traced once, as before the fitted polynomials) against
the fitted polynomials and the run's shared price cache.
Usage: python scripts/pricing_share.py [images] [tau]  (the `tiny` model, its PAUMER
heads untrained, so a tau near 1 makes counts ragged; data: ../shared/data/idd-lite)."""
import sys
import time
from pathlib import Path

import torch

from bench import datasets, flops
from bench.protocol import EvalSettings, evaluate
from methods import METHODS
from methods.segmenter import build_model


class NoPricing:
    """Stands in for a FlopModel: every image 0 FLOPs (the evaluation without pricing)."""

    def image_flops(self, trace, image_hw):
        return torch.zeros(trace.tokens.shape[0], dtype=torch.long)


def timed_eval(model, policy, val, flop_model, limit):
    t0 = time.perf_counter()
    result = evaluate(model, policy, val, EvalSettings(batch_size=8), flop_model, num_classes=7, limit=limit)
    return time.perf_counter() - t0, result["gflops"]["mean"]


def main(limit: int = 64, tau: float = 0.97) -> None:
    torch.set_num_threads(2)
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "idd-lite"
    val = datasets.open_dataset("idd-lite", "val", str(root))
    torch.manual_seed(0)
    spec = METHODS["paumer"]
    trained = spec.fine_tune.build(build_model(7, "tiny"), **spec.fine_tune.knobs).eval()
    model = trained.segmenter
    policy = spec.make_policy(trained, tau=tau)
    timed_eval(model, policy, val, NoPricing(), 8)  # warm-up: first-call costs hit no row
    bare, _ = timed_eval(model, policy, val, NoPricing(), limit)  # no pricing at all
    fitted = type(policy).quadratic_costs
    try:  # before: every token count traced
        flops.QUADRATIC_MODEL_KEYS, type(policy).quadratic_costs = (), ()
        prices = flops.PriceCache()
        before, g_before = timed_eval(model, policy, val, flops.FlopModel(model, policy, prices), limit)
    finally:
        flops.QUADRATIC_MODEL_KEYS, type(policy).quadratic_costs = (("block",),), fitted
    new = flops.PriceCache()
    after, g_after = timed_eval(model, policy, val, flops.FlopModel(model, policy, new), limit)
    again, _ = timed_eval(model, spec.make_policy(trained, tau=tau - 0.02), val,
                          flops.FlopModel(model, spec.make_policy(trained, tau=tau - 0.02), new), limit)
    assert g_before == g_after, (g_before, g_after)  # the same FLOPs, to the last one
    for name, total, p in (("per-count tracing", before, prices), ("fitted + shared cache", after, new)):
        print(f"{name:22s} eval {total:6.1f} s, pricing {p.seconds:6.1f} s in {p.traces} traces "
              f"= {100 * (total - bare) / total:4.1f}% of the evaluation (no pricing: {bare:.1f} s)")
    print(f"a second operating point on the shared cache: {again:.1f} s, {new.traces} traces in all; "
          f"{limit} images, tau={tau}, {g_after:.3f} GFLOPs/image")


if __name__ == "__main__":
    main(*(int(sys.argv[1]),) if len(sys.argv) > 1 else (), *(float(sys.argv[2]),) if len(sys.argv) > 2 else ())
