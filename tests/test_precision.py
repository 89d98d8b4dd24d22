"""--precision and --compile: applied in one place (protocol.execution) for evaluation
and timing, recorded, part of a record's identity, refused in one line where unsupported."""
import json

import pytest
import torch

from bench import protocol
from bench.cli import main
from bench.errors import BenchError
from bench.flops import FlopModel
from bench.protocol import EvalSettings, execution, predict
from bench.results import ResultsStore, record_identity
from bench.speed import SpeedOptions, run_speed
from methods.encoder import Policy
from methods.paumer import PaumerModel, PaumerPolicy
from tests.test_cli import assert_one_line_error, run_cli, toy  # noqa: F401 - toy is a fixture
from tests.test_report import full_record


class CountingBackend:
    """A torch.compile backend that counts graph compilations and runs them eagerly."""

    __name__ = "counting"

    def __init__(self):
        self.graphs = 0
        self.code = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.code.append(gm.code)
        return gm.forward


def images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_bf16_autocasts_the_forward_on_cpu_and_returns_fp32_logits_close_to_fp32(small_model):
    seen = []
    small_model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x = images(2)
    with torch.inference_mode():
        flops = FlopModel(small_model, Policy())
        fp32 = predict(small_model, Policy(), x, EvalSettings(), flop_model=flops)
        bf16 = predict(small_model, Policy(), x, EvalSettings(precision="bf16"), flop_model=flops)
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    assert bf16.logits.dtype == torch.float32
    assert not torch.equal(bf16.logits, fp32.logits)  # computed at the lower precision
    torch.testing.assert_close(bf16.logits, fp32.logits, atol=0.1, rtol=0.05)
    assert bf16.flops.tolist() == fp32.flops.tolist()  # FLOPs are counted, not timed: the same


def test_tf32_sets_the_cuda_flags_inside_and_restores_them_after(small_model):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with execution(small_model, EvalSettings(precision="tf32")):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_cpu_refuses_fp16_and_tf32_in_one_line_before_any_work(capsys, tmp_path, toy, precision):  # noqa: F811
    code, _, err = run_cli(capsys, "run", "--method", "static", "--op", "scale=0.5", "--dataset", "toy",
                           "--precision", precision, "--checkpoints", str(tmp_path / "ck"),
                           "--results", str(tmp_path / "res"), "--quiet")
    assert code == 2
    assert_one_line_error(code, err, f"--precision {precision} needs a CUDA device", "fp32 or bf16")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "res").exists()  # nothing trained or written
    code, _, err = run_cli(capsys, "speed", "--model", "tiny", "--size", "32", "--precision", precision,
                           "--results", str(tmp_path / "res"))
    assert code == 2 and not (tmp_path / "res").exists()
    assert_one_line_error(code, err, "needs a CUDA device")


def test_a_compiler_that_does_not_work_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(protocol.COMPILE_BACKEND_ENV, "no-such-backend")
    code, _, err = run_cli(capsys, "speed", "--model", "tiny", "--size", "32", "--compile",
                           "--results", str(tmp_path / "res"))
    assert code == 2
    assert_one_line_error(code, err, "--compile", "no-such-backend", "run without --compile")
    assert not (tmp_path / "res").exists()


def test_bench_run_records_precision_and_old_float32_records_are_the_same_fp32_measurement(capsys, tmp_path, toy):  # noqa: F811
    common = ["run", "--method", "static", "--op", "scale=0.5", "--dataset", "toy", "--checkpoints",
              str(tmp_path / "ck"), "--results", str(tmp_path / "res"), "--quiet", "--timing-images", "2",
              "--repeats", "1"]
    stored = tmp_path / "res" / "toy.jsonl"
    main(common)
    fp32 = json.loads(stored.read_text())
    assert fp32["precision"] == "fp32" and fp32["compile"] is False
    # a record stored before --precision existed said "float32" (older still: only `dtype`)
    old = dict(fp32, precision="float32")
    older = {k: v for k, v in fp32.items() if k != "precision"} | {"dtype": "float32"}
    assert record_identity(old) == record_identity(fp32) == record_identity(older)
    stored.write_text(json.dumps(old) + "\n")
    capsys.readouterr()
    main(common)  # a new fp32 run finds the old record: nothing to measure
    assert "nothing to do" in capsys.readouterr().out
    main(common + ["--precision", "bf16"])  # another precision is another measurement
    assert "1 record(s) appended" in capsys.readouterr().out
    records = ResultsStore(tmp_path / "res").load()
    assert [r.get("precision") for r in records] == ["float32", "bf16"]
    assert record_identity(records[1]) != record_identity(records[0])
    assert record_identity(dict(fp32, compile=True)) != record_identity(fp32)


def ragged_batches(model, count, seed):
    """PAUMER schedule policies whose batches keep different token counts."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        first = 0.5 + 0.45 * torch.rand(1, generator=g).item()
        stay = [first, first * (0.3 + 0.5 * torch.rand(1, generator=g).item())]
        yield PaumerPolicy(model.pausing, criterion="schedule", stay=stay, spread=0.3, batching="pad")


def test_compile_does_not_recompile_per_batch_when_token_counts_change(small_model):
    import torch._dynamo

    torch._dynamo.reset()
    model = PaumerModel(small_model, layers=[1, 2]).eval()
    backend = CountingBackend()
    settings = EvalSettings(batch_size=3, compile=True, compile_backend=backend)
    counts = []

    def forward(policy, seed):
        with torch.inference_mode():
            pred = predict(small_model, policy, images(3, seed), settings)
        counts.append(tuple(map(tuple, pred.tokens.tolist())))

    forward(Policy(), 0)  # warm-up: the full model (no mask), and ragged batches (a mask)
    for i, policy in enumerate(ragged_batches(model, 2, seed=1)):
        forward(policy, i)
    warm = backend.graphs
    assert warm > 0  # the blocks and the decoder did run compiled
    for i, policy in enumerate(ragged_batches(model, 8, seed=2)):
        forward(policy, 10 + i)
    assert len(set(counts[3:]) - set(counts[:3])) >= 6  # new token counts, batch after batch
    assert backend.graphs == warm  # ... and not one new compilation


@pytest.mark.parametrize("batching", ["pad", "packed"])
def test_compiled_outputs_equal_uncompiled_ones(small_model, batching):
    model = PaumerModel(small_model, layers=[1, 2]).eval()
    policy = PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.3, batching=batching)
    x = images(3, seed=5)
    with torch.inference_mode():
        for p in (Policy(), policy):
            eager = predict(small_model, p, x, EvalSettings(batch_size=3))
            compiled = predict(small_model, p, x, EvalSettings(batch_size=3, compile=True, compile_backend="eager"))
            torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
            assert compiled.tokens.tolist() == eager.tokens.tolist()
    assert all(b._compiled_call_impl is None for b in small_model.blocks)  # compiled only inside predict


def test_bench_speed_records_precision_and_compile(tmp_path):
    opts = SpeedOptions(model="tiny", size=32, batch_sizes=[2], methods=["paumer"], timing_images=2, warmup=0,
                        repeats=1, results=str(tmp_path), precision="bf16", compile=True, compile_backend="eager")
    records = run_speed(opts)
    assert {(r["precision"], r["compile"]) for r in records} == {("bf16", True)}
    with pytest.raises(BenchError, match="expected one of fp32, tf32, bf16, fp16"):
        run_speed(SpeedOptions(model="tiny", size=32, precision="float64", results=str(tmp_path)))


def test_report_marks_bf16_and_compiled_rows_and_leaves_fp32_tables_alone():
    from bench.report import EXECUTION, csv_frame, markdown, table

    plain = [full_record("baseline", {}, 0.6, 2.0), full_record("static", {"scale": 0.5}, 0.5, 0.5)]
    text = markdown(table(plain))
    assert EXECUTION not in text and "compile" not in csv_frame(table(plain)).columns
    mixed = plain + [full_record("static", {"scale": 0.75}, 0.55, 1.0, precision="bf16"),
                     full_record("tome", {"r": 2}, 0.58, 1.5, compile=True)]
    lines = markdown(table(mixed)).splitlines()
    assert EXECUTION in lines[0]
    assert any("| bf16 |" in l and "scale=0.75" in l for l in lines)
    assert any("| fp32 compiled |" in l and "r=2" in l for l in lines)
    assert any("| fp32 |" in l and "scale=0.5" in l for l in lines)
    assert csv_frame(table(mixed))["compile"].tolist().count(True) == 1


def test_compile_reaches_the_mlps_of_policies_that_run_blocks_their_own_way(small_model):
    from methods.tome import ToMePolicy

    x = images(3, seed=7)
    model = PaumerModel(small_model, layers=[1, 2]).eval()
    with torch.inference_mode():
        for p in (ToMePolicy(small_model.depth, r=3),
                  PaumerPolicy(model.pausing, criterion="schedule", stay=[0.7, 0.4], spread=0.3, batching="packed")):
            backend = CountingBackend()
            eager = predict(small_model, p, x, EvalSettings(batch_size=3))
            compiled = predict(small_model, p, x, EvalSettings(batch_size=3, compile=True, compile_backend=backend))
            torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
            # ToMe's merging block calls block.mlp itself: that MLP runs compiled all the same
            assert any("fc1" in code and "qkv" not in code for code in backend.code)
