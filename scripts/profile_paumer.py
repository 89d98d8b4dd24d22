"""Where PAUMER's time goes at batch 1 on CPU: which part of a forward does not fall
with the number of active tokens. Usage: python scripts/profile_paumer.py [tau ...]

Times each stage of `predict` separately (median over the validation images), for the
baseline checkpoint and the PAUMER checkpoint at each tau, with the run's defaults
(tiny on synthetic, 2 threads)."""
import statistics
import sys
import time

import torch

from bench import datasets
from bench.runner import RunOptions, checkpoint_path, fine_tune_config, new_model, stored_checkpoint, train_config
from bench.train import normalize
from methods import METHODS
from methods.encoder import Policy, run_encoder


def stages(model, policy, x):
    t = [time.perf_counter()]
    tokens, grid = model.embed(x)
    t.append(time.perf_counter())
    state = run_encoder(model.blocks, tokens, grid, policy, model=model, prefix=model.num_prefix_tokens)
    t.append(time.perf_counter())
    full = state.to_grid()
    t.append(time.perf_counter())
    model.decode(full, grid, x.shape[-2:])
    t.append(time.perf_counter())
    return [1e3 * (b - a) for a, b in zip(t, t[1:])], state.trace.tokens.float().mean().item()


def checkpoints(opts: RunOptions, spec) -> tuple:
    """(baseline config, baseline payload, PAUMER payload): the PAUMER checkpoint is the
    one fine-tuned from this baseline with the run's fine-tune configuration, the one
    `bench run --method paumer` uses (not whichever paumer-*.pt sorts last)."""
    base_cfg = train_config(opts, spec)
    base = stored_checkpoint(opts, base_cfg)
    if base is None:
        sys.exit(f"no trained baseline at {checkpoint_path(opts, base_cfg)}: run `bench train` first")
    cfg = fine_tune_config(METHODS["paumer"], base_cfg, base["weights"])
    paumer = stored_checkpoint(opts, cfg)
    if paumer is None:
        sys.exit(f"no trained PAUMER checkpoint at {checkpoint_path(opts, cfg)}: run `bench train --method paumer` first")
    return base_cfg, base, paumer


@torch.inference_mode()
def main(taus):
    torch.set_num_threads(2)
    opts = RunOptions()
    spec = datasets.get_spec("synthetic")
    base_cfg, base_payload, paumer_payload = checkpoints(opts, spec)
    base = new_model(base_cfg)
    base.load_state_dict(base_payload["model"])
    spec_m = METHODS["paumer"]
    trained = spec_m.fine_tune.build(new_model(base_cfg))
    trained.load_state_dict(paumer_payload["model"])
    val = datasets.open_dataset("synthetic", "val")
    images = [normalize(val[i][0][None]) for i in range(32)]
    runs = [("baseline", base, Policy())] + [(f"paumer tau={t}", trained.segmenter, spec_m.make_policy(trained, tau=t))
                                             for t in taus]
    print("| run | tokens/block | embed ms | encoder ms | to_grid ms | decode ms | total ms |")
    print("|---|---|---|---|---|---|---|")
    for name, model, policy in runs:
        model.eval()
        for x in images[:4]:
            stages(model, policy, x)  # warm-up
        rows = [stages(model, policy, x) for _ in range(3) for x in images]
        med = [statistics.median(r[0][i] for r in rows) for i in range(4)]
        toks = statistics.mean(r[1] for r in rows)
        print(f"| {name} | {toks:.0f} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {sum(med):.2f} |")
    block_times(base)


@torch.inference_mode()
def block_times(model, counts=(256, 192, 128, 64, 32, 16)):
    """One timm block at n tokens: how far its time falls with n."""
    print("\n| tokens | one block ms | ms per 100 tokens |")
    print("|---|---|---|")
    for n in counts:
        x = torch.randn(1, n, model.config.embed_dim)
        for _ in range(5):
            model.blocks[0](x)
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            model.blocks[0](x)
            ts.append(1e3 * (time.perf_counter() - t))
        med = statistics.median(ts)
        print(f"| {n} | {med:.3f} | {100 * med / n:.3f} |")


if __name__ == "__main__":
    main([float(t) for t in sys.argv[1:]] or [0.0, 0.1, 0.3, 0.5])
