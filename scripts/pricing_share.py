"""What share of an IDD-Lite PAUMER evaluation is FLOP pricing (the time inside
``FlopModel.image_flops``), with every (component, token count) traced by fvcore once
(as before the fitted polynomials) and with the fitted polynomials + the run's shared
price cache. Usage: PYTHONPATH=. python scripts/pricing_share.py [images]

The `tiny` model on IDD-Lite val (../shared/data/idd-lite), PAUMER's heads untrained, so
its decisions are forced by the token schedule `bench speed` uses (default_stay, spread
0.1: per-image ragged counts, as a trained threshold gives); 2 threads."""
import sys
import time
from pathlib import Path

import torch

from bench import datasets, flops
from bench.protocol import EvalSettings, evaluate
from methods import METHODS
from methods.paumer import PaumerPolicy
from methods.segmenter import build_model


class TimedPricing:
    """A FlopModel whose ``image_flops`` calls are timed (``seconds``)."""

    def __init__(self, flop_model):
        self.flop_model, self.seconds = flop_model, 0.0

    def image_flops(self, trace, image_hw):
        t0 = time.perf_counter()
        try:
            return self.flop_model.image_flops(trace, image_hw)
        finally:
            self.seconds += time.perf_counter() - t0


def measure(model, policy, val, prices, limit):
    timed = TimedPricing(flops.FlopModel(model, policy, prices))
    t0 = time.perf_counter()
    result = evaluate(model, policy, val, EvalSettings(batch_size=8, resize_short=160), timed, num_classes=7,
                      limit=limit)  # the preset's resize rule
    return time.perf_counter() - t0, timed.seconds, result["gflops"]["mean"]


def main(limit: int = 64) -> None:
    torch.set_num_threads(2)
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "idd-lite"
    val = datasets.open_dataset("idd-lite", "val", str(root))
    torch.manual_seed(0)
    spec = METHODS["paumer"]
    trained = spec.fine_tune.build(build_model(7, "tiny"), **spec.fine_tune.knobs).eval()
    model = trained.segmenter

    def policy(spread=0.1):
        return PaumerPolicy(trained.pausing, criterion="schedule", spread=spread)

    fitted = PaumerPolicy.quadratic_costs
    try:  # before: every token count traced
        flops.QUADRATIC_MODEL_KEYS, PaumerPolicy.quadratic_costs = (), ()
        before = measure(model, policy(), val, flops.PriceCache(), limit)
    finally:
        flops.QUADRATIC_MODEL_KEYS, PaumerPolicy.quadratic_costs = (("block",),), fitted
    prices = flops.PriceCache()
    after = measure(model, policy(), val, prices, limit)
    second = measure(model, policy(0.2), val, prices, limit)  # another operating point of the run
    assert before[2] == after[2], (before[2], after[2])  # the same FLOPs
    for name, (total, pricing, _) in (("per-count tracing", before), ("fitted + shared cache", after),
                                      ("2nd point, same cache", second)):
        print(f"{name:22s} eval {total:6.1f} s, pricing {pricing:6.2f} s = {100 * pricing / total:5.1f}%")
    print(f"{limit} images, {after[2]:.3f} GFLOPs/image, {prices.traces} fvcore traces in the shared cache")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
