"""Which stored records the report can use: every field it reads checked, a bad record
named (file and line) and skipped."""
from __future__ import annotations

from typing import Optional

from bench.results import ResultsStore


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v) -> str:
    if v is None:
        return "null"
    if _is_number(v):
        return "a number"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _number_problem(container: dict, key: str, where: str, required: bool = False) -> Optional[str]:
    """Numbers may be null: that is how a record stores NaN."""
    if key not in container:
        return f"lacks field '{where}'" if required else None
    v = container[key]
    return None if v is None or _is_number(v) else f"field '{where}' is {_kind(v)}, expected a number"


def _pair_problem(v, where: str) -> Optional[str]:
    if v is None or (isinstance(v, list) and len(v) == 2 and all(x is None or _is_number(x) for x in v)):
        return None
    return f"field '{where}' is {_kind(v)}, expected [p25, p75]"


def plain_name(v) -> bool:
    """A name that can be part of a file name under ``--out``: a non-empty string with no
    path separator, not starting with a dot ("..", hidden files), not absolute."""
    return (isinstance(v, str) and bool(v) and not v.startswith(".") and "/" not in v and "\\" not in v
            and ":" not in v and "\0" not in v and v.isprintable())


def _speed_problem(speed) -> Optional[str]:
    if not isinstance(speed, dict):
        return "lacks field 'speed'" if speed is None else f"field 'speed' is {_kind(speed)}, expected an object"
    for bs, entry in speed.items():
        if not (bs.isascii() and bs.isdigit() and int(bs) > 0):  # "²".isdigit() holds too
            return f"speed key {bs!r} is not a batch size"
        if not isinstance(entry, dict):
            return f"field 'speed.{bs}' is {_kind(entry)}, expected an object"
        for key in ("throughput", "speedup"):
            if problem := _number_problem(entry, key, f"speed.{bs}.{key}"):
                return problem
    return None


def record_problem(r: dict) -> Optional[str]:
    """Why the report cannot use this stored record; None when it can."""
    if not plain_name(r["dataset"]):  # it names files under --out: never a path
        return (f"field 'dataset' is {r['dataset']!r}, expected a plain name (no path separator, "
                "no leading dot)" if isinstance(r["dataset"], str) else
                f"field 'dataset' is {_kind(r['dataset'])}, expected a string")
    if not isinstance(r["method"], str):
        return f"field 'method' is {_kind(r['method'])}, expected a string"
    if not isinstance(r["knobs"], dict):
        return f"field 'knobs' is {_kind(r['knobs'])}, expected an object"
    if "study" in r:  # scripts/depth_study.py: accuracy only (study_report)
        settings = r["study"]
        if not isinstance(settings, dict) or not all(_is_number(settings.get(k)) for k in ("depth", "steps")):
            return "field 'study' lacks a numeric 'depth' or 'steps'"
        return _number_problem(r, "miou", "miou", required=True)
    if r["dataset"] == "speed":  # `bench speed`: no accuracy (speed_report)
        problem = _number_problem(r, "gflops_ratio", "gflops_ratio", required=True)
        if problem is None and not isinstance(r.get("gflops"), dict):
            problem = "lacks field 'gflops'" if "gflops" not in r else f"field 'gflops' is {_kind(r['gflops'])}, expected an object"
        return (problem or _number_problem(r["gflops"], "mean", "gflops.mean", required=True)
                or _speed_problem(r.get("speed")))
    problem = _number_problem(r, "miou", "miou", required=True)
    for key in ("miou_delta", "baseline_miou", "gflops_ratio", "baseline_gflops", "control_miou",
                "miou_delta_control"):
        problem = problem or _number_problem(r, key, key)
    for key in ("miou_ci", "miou_delta_ci", "miou_delta_control_ci"):
        v = r.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 2 and all(x is None or _is_number(x) for x in v)):
            problem = problem or f"field '{key}' is {_kind(v)}, expected [low, high]"
    if problem:
        return problem
    if "gflops" not in r:
        return "lacks field 'gflops'"
    if not isinstance(r["gflops"], dict):
        return f"field 'gflops' is {_kind(r['gflops'])}, expected an object"
    if problem := _number_problem(r["gflops"], "mean", "gflops.mean", required=True):
        return problem
    if "speed" not in r:
        return "lacks field 'speed'"
    if not isinstance(r["speed"], dict):
        return f"field 'speed' is {_kind(r['speed'])}, expected an object"
    for bs, entry in r["speed"].items():
        if not (bs.isascii() and bs.isdigit() and int(bs) > 0):
            return f"speed key {bs!r} is not a batch size"
        if not isinstance(entry, dict):
            return f"field 'speed.{bs}' is {_kind(entry)}, expected an object"
        for key in ("throughput", "speedup"):
            problem = problem or _number_problem(entry, key, f"speed.{bs}.{key}")
        problem = problem or _pair_problem(entry.get("speedup_iqr"), f"speed.{bs}.speedup_iqr")
        latency = entry.get("latency_ms", {})
        if not isinstance(latency, dict):
            return f"field 'speed.{bs}.latency_ms' is {_kind(latency)}, expected an object"
        for key in ("p50", "p90"):
            problem = problem or _number_problem(latency, key, f"speed.{bs}.latency_ms.{key}")
        if problem:
            return problem
    tokens = r.get("tokens_per_block")
    if tokens is not None and not (isinstance(tokens, list) and all(t is None or _is_number(t) for t in tokens)):
        return f"field 'tokens_per_block' is {_kind(tokens)}, expected a list of numbers"
    per_class = r.get("per_class_iou")
    if per_class is not None and not (isinstance(per_class, dict)
                                      and all(v is None or _is_number(v) for v in per_class.values())):
        return f"field 'per_class_iou' is {_kind(per_class)}, expected an object of numbers"
    if not isinstance(r.get("train", {}), dict):
        return f"field 'train' is {_kind(r['train'])}, expected an object"
    return None


def usable_records(results: str) -> tuple[list[dict], int]:
    """The records the report can use, and how many it skipped (each named on stdout
    with its file and line)."""
    located, problems = ResultsStore(results).load_located()
    for p in problems:
        print(f"warning: skipped {p}")
    records = []
    for where, r in located:
        why = record_problem(r)
        if why:
            print(f"warning: skipped {where}: {why}")
            problems.append(where)
        else:
            records.append(r)
    return records, len(problems)
