"""Methods as plugins: the entry-point group `bench.methods`, and the example package of
docs/add-a-method.md (examples/bench-random-drop) run end to end."""
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.flops import FlopModel
from bench.runner import get_method
from methods import METHODS, MethodSpec, all_methods, plugin_methods
from methods.segmenter import build_model
from tests.test_cli import toy  # noqa: F401 (fixture: a tiny dataset and model preset)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "bench-random-drop"


def install(site: Path, dist: str, entry_points: dict, modules: dict) -> None:
    """What `pip install` leaves for importlib.metadata: a dist-info folder with the
    entry points (group bench.methods), and the modules next to it."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[bench.methods]\n{lines}")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


def example_entry_points() -> dict:
    """The entry points the example's pyproject.toml declares (what pip would install)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["bench.methods"]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty site-packages on sys.path; plugin discovery starts afresh and the plugins'
    modules are forgotten afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    plugin_methods.cache_clear()
    yield site
    plugin_methods.cache_clear()
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(site)):
            del sys.modules[name]


@pytest.fixture
def random_drop(site):
    """The example package installed: its pyproject's entry points, its module's source."""
    install(site, "bench-random-drop", example_entry_points(),
            {"bench_random_drop": (EXAMPLE / "bench_random_drop.py").read_text()})
    return site


def test_example_plugin_is_found_next_to_the_builtins(random_drop):
    methods = all_methods()
    assert list(methods) == [*METHODS, "random-drop"]
    spec = methods["random-drop"]
    assert isinstance(spec, MethodSpec) and spec.swept == "fraction"
    assert get_method("random-drop") is spec
    assert "random-drop" not in METHODS  # the built-in registry is left as it is
    with pytest.raises(BenchError, match="unknown method 'nope'.*random-drop"):
        get_method("nope")


def test_discovery_is_lazy_and_cached(random_drop, monkeypatch):
    calls = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    import methods  # noqa: F401

    get_method("tome")  # a built-in needs no plugin
    assert calls == [] and "bench_random_drop" not in sys.modules
    get_method("random-drop")
    all_methods()
    get_method("random-drop")
    assert calls == [{"group": "bench.methods"}] and "bench_random_drop" in sys.modules


BROKEN = '''
from methods import METHODS, MethodSpec
NOT_A_SPEC = 42
def explodes():
    raise RuntimeError("no GPU here")
def misnamed():
    return MethodSpec("other-name", "", lambda model: None, [{}])
def second_random_drop():
    return MethodSpec("random-drop", "", lambda model: None, [{}])
tome = METHODS["tome"]
'''


def test_a_broken_plugin_is_one_line_and_the_others_still_load(random_drop, capsys):
    install(random_drop, "bench-broken", {
        "missing": "no_such_module_here:method",
        "wrong-type": "broken_plugin:NOT_A_SPEC",
        "explodes": "broken_plugin:explodes",
        "misnamed": "broken_plugin:misnamed",
        "tome": "broken_plugin:tome",
        "random-drop": "broken_plugin:second_random_drop",
    }, {"broken_plugin": BROKEN})
    methods = all_methods()
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(err) == sorted([
        "warning: skipped method plugin 'missing' (no_such_module_here:method): "
        "ModuleNotFoundError: No module named 'no_such_module_here'",
        "warning: skipped method plugin 'wrong-type' (broken_plugin:NOT_A_SPEC): "
        "expected a MethodSpec or a callable returning one, got int",
        "warning: skipped method plugin 'explodes' (broken_plugin:explodes): RuntimeError: no GPU here",
        "warning: skipped method plugin 'misnamed' (broken_plugin:misnamed): "
        "the entry point's name must be the method's, got MethodSpec name 'other-name'",
        "warning: skipped method plugin 'tome' (broken_plugin:tome): "
        "the name clashes with a built-in method (the built-in is kept)",
        next(line for line in err if "another plugin already registered that name" in line),
    ])
    assert set(methods) == {*METHODS, "random-drop"} and methods["tome"] is METHODS["tome"]
    all_methods()
    assert capsys.readouterr().err == ""  # cached: warned once


def test_random_drop_keeps_the_fraction_and_prices_its_own_step(random_drop, small_model):
    spec = get_method("random-drop")
    policy = spec.make_policy(small_model, fraction=0.5, layer=1)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, state = small_model.forward_state(images, policy)
        _, base_state = small_model.forward_state(images)
    assert logits.shape == (2, 5, 32, 32)
    with torch.no_grad():  # dropping nothing is the baseline
        assert torch.equal(small_model(images, spec.make_policy(small_model, fraction=0.0)), small_model(images))
    assert state.trace.tokens.tolist() == [[16, 8, 8, 8]] * 2  # 16 tokens, half leave after block 1
    assert ((state.left_at == 1).sum(1) == 8).all() and ((state.left_at == 4).sum(1) == 8).all()
    flops, base = FlopModel(small_model, policy), FlopModel(small_model)
    assert flops.cost(("random-drop",), 16) == 0  # random draws and a sort: no multiply-adds
    saved = base.image_flops(base_state, (32, 32)) - flops.image_flops(state, (32, 32))
    assert saved.tolist() == [3 * (base.cost(("block",), 16) - base.cost(("block",), 8))] * 2
    for bad in ({"fraction": 1.5}, {"layer": 4}, {"layer": 0}):
        with pytest.raises(ValueError):
            spec.make_policy(small_model, **bad)


def test_bench_run_stores_a_record_of_the_plugin_method(random_drop, toy, tmp_path, capsys):
    main(["run", "--method", "random-drop", "--op", "fraction=0.5", "--dataset", "toy", "--steps", "2",
          "--limit", "2", "--timing-images", "2", "--repeats", "1", "--batch-size", "2", "--quiet",
          "--checkpoints", str(tmp_path / "ck"), "--results", str(tmp_path / "res")])
    assert "1 record(s) appended" in capsys.readouterr().out
    [record] = [json.loads(line) for line in (tmp_path / "res" / "toy.jsonl").read_text().splitlines()]
    assert record["method"] == "random-drop" and record["knobs"] == {"fraction": 0.5}
    assert record["checkpoint"] == record["baseline_checkpoint"]  # no fine-tuning: the baseline's weights
    assert record["images"] == 2 and set(record["speed"]) == {"1", "2"}
    assert record["tokens_per_block"] == [1.0, 0.5, 0.5]  # the toy preset: 3 blocks of 16 tokens
    flops = FlopModel(build_model(5, "tiny"))
    block = flops.cost(("block",), 16) - flops.cost(("block",), 8)
    assert record["baseline_gflops"] - record["gflops"]["mean"] == pytest.approx(2 * block / 1e9)


def test_the_docs_show_the_example_as_it_is():
    page = (REPO / "docs" / "add-a-method.md").read_text()
    blocks = re.findall(r"^```(toml|python)\n(.*?)^```", page, re.M | re.S)
    shown = {lang: text for lang, text in blocks if "random-drop" in text}
    assert shown["toml"] == (EXAMPLE / "pyproject.toml").read_text()
    assert shown["python"] == (EXAMPLE / "bench_random_drop.py").read_text()


def test_report_draws_one_line_per_variant_of_a_plugin_method(random_drop):
    from bench.report import series

    assert series("random-drop", {"fraction": 0.5}) == "random-drop"  # the swept knob is the x axis
    assert series("random-drop", {"fraction": 0.5, "layer": 2}) == "random-drop layer=2"
