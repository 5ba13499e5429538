"""adaptive_transfer.experiment: statistics, plan, fingerprinted reuse, the
summary's verdicts, and the quick mode end to end through the real stages."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_transfer.experiment import plan as P
from adaptive_transfer.experiment.report import summarize_results
from adaptive_transfer.experiment.stats import binomial_sd, entropy_bits, paired_difference, summarize, t975
from tests.helpers import ROOT

# -- statistics ----------------------------------------------------------------------------


def test_summary_and_t_interval():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["n"] == 5 and s["mean"] == 3.0
    assert s["std"] == pytest.approx(1.5811, abs=1e-4)
    half = 2.776 * 1.5811 / 5 ** 0.5  # t(4 df) = 2.776
    assert s["ci95"] == pytest.approx([3 - half, 3 + half], abs=1e-3)
    assert summarize([7.0]) == {"n": 1, "mean": 7.0, "std": None, "ci95": None}
    assert t975(1) == 12.706 and t975(100) == 1.96
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_paired_difference_uses_common_seeds_only():
    a = {0: 90.0, 1: 91.0, 2: 89.0, 3: 50.0}
    b = {0: 88.0, 1: 88.0, 2: 88.0}
    d = paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2] and d["differences"] == [2.0, 3.0, 1.0]
    assert d["mean"] == 2.0 and d["wins"] == 3
    half = 4.303 * 1.0 / 3 ** 0.5  # std 1 over 3 seeds, t(2 df): the interval still includes 0
    assert d["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-3)
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_binomial_noise_and_entropy():
    assert binomial_sd(0.9, 3200) == pytest.approx(0.0053, abs=1e-4)
    assert entropy_bits([0.25] * 4) == pytest.approx(2.0)
    assert entropy_bits([1.0, 0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        entropy_bits([-1.0, 2.0])


# -- the plan --------------------------------------------------------------------------------


def test_plan_covers_every_target_and_arm_and_shares_target_free_sets():
    runs = P.finetune_runs(P.FULL, seed=3)
    main = [r for r in runs if not r.figure3]
    assert {(r.target, r.arm) for r in main} == {(t.name, a) for t in P.FULL.targets for a, _ in P.ARMS}
    assert all(r.seed == 3 and (r.init is None or r.init.seed == 3) for r in runs)
    by = {(r.target, r.arm): r.init for r in main}
    # one entire-source model serves all targets; each branch subset is one target's
    # hand-picked and another's wrong-domain arm
    assert by[("food", "entire")] is by[("vehicle", "entire")]
    assert by[("animal", "wrong-domain")] == by[("vehicle", "hand-picked")]
    assert by[("food", "random-init")] is None
    sizes = {r.init.size for r in runs if r.init}
    assert len(set(P.FULL.figure3_sizes)) >= 3 and set(P.FULL.figure3_sizes) <= sizes
    assert len(P.FULL.seeds) >= 5 and len(P.FULL.targets) >= 3
    # every arm has the same pre-training size; elastic below the source size (so it differs from 'entire')
    assert {r.init.size for r in main if r.init} == {P.FULL.size} and P.FULL.size < P.FULL.world.source.num_examples


# -- the composed commands' reuse (adaptive_transfer.stages) ---------------------------------


def _builder(calls):
    def build(path):
        calls.append(path)
        with open(os.path.join(path, "out.txt"), "w") as fh:
            fh.write(str(len(calls)))
    return build


def _engines():
    from adaptive_transfer.stages import Engines

    return Engines(log=lambda m: None)


def test_reuse_only_with_the_same_fingerprint(tmp_path):
    from adaptive_transfer.stages import generated

    calls, e = [], _engines()
    path = str(tmp_path / "seed-0" / "entire")
    code = "adaptive_transfer.synthetic"
    assert generated(path, "demo_source", {"seed": 0}, _builder(calls), code, "x", e) is False
    assert len(calls) == 1 and (e.built, e.reused) == (1, 0)
    assert generated(path, "demo_source", {"seed": 0}, _builder(calls), code, "x", e) is True
    assert len(calls) == 1 and (e.built, e.reused) == (1, 1)
    # another seed (or any other setting, or other code) is never served the first one's output:
    # rebuilt aside, the old result replaced only once the new one is complete
    assert generated(path, "demo_source", {"seed": 1}, _builder(calls), code, "x", e) is False
    assert len(calls) == 2 and open(os.path.join(path, "out.txt")).read() == "2"
    assert generated(path, "demo_source", {"seed": 1}, _builder(calls), "adaptive_transfer.real_data.split",
                     "x", e) is False and len(calls) == 3


def test_a_killed_build_is_rebuilt_and_foreign_directories_are_refused(tmp_path):
    from adaptive_transfer.stages import generated

    path = str(tmp_path / "run")
    code = "adaptive_transfer.synthetic"

    def crash(p):
        open(os.path.join(p, "half.txt"), "w").close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generated(path, "demo_source", {"seed": 0}, crash, code, "x", _engines())
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-made left, nothing taken for a result
    calls = []
    assert generated(path, "demo_source", {"seed": 0}, _builder(calls), code, "x", _engines()) is False
    assert len(calls) == 1
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="was not written by demo_source"):
        generated(str(foreign), "demo_source", {"seed": 0}, _builder([]), code, "x", _engines())
    assert (foreign / "precious.txt").read_text() == "x"


# -- verdicts ----------------------------------------------------------------------------------


def _records(gaps: dict[str, float], seeds=range(5)):
    out = []
    for s in seeds:
        for arm, _ in P.ARMS:
            acc = 0.80 + gaps.get(arm, 0.0) + 0.002 * ((s * 7 + len(arm)) % 3)
            out.append({"seed": s, "target": "t", "arm": arm, "figure3": False, "size": 100, "set": arm,
                        "top1": acc, "mean_per_class": acc, "test_images": 1000, "unique_examples": 50,
                        "samples": 100, "share_on_target_leaves": 0.5})
    return out


def _per_seed(accuracies: dict[str, list[float]]):
    """Records of target 't' with each arm's top-1 per seed 0..4 (0.80 where not given)."""
    return [{"seed": s, "target": "t", "arm": arm, "figure3": False, "size": 100, "set": arm, "top1": acc,
             "mean_per_class": acc, "test_images": 1000, "unique_examples": 50, "samples": 100,
             "share_on_target_leaves": 0.5}
            for arm, _ in P.ARMS for s, acc in enumerate(accuracies.get(arm, [0.80] * 5))]


#: Per-seed top-1 against an arm at 0.80 on every seed, as paired differences in points:
UP = [0.85, 0.86, 0.85, 0.86, 0.85]  # +5, +6, +5, +6, +5: interval [4.72, 6.08], wholly above 0
MIXED = [0.82, 0.78, 0.81, 0.79, 0.805]  # +2, -2, +1, -1, +0.5: the interval includes 0
HELD, FALSIFIED, NOT_SHOWN = "held", "falsified", "not shown (an interval includes 0)"


def test_verdicts_follow_the_intervals():
    # The claims, in order: adaptive > entire ('above'); adaptive not below hand-picked
    # ('not-below'); uniform > reversed and adaptive top-k > uniform ('above', both);
    # adaptive > class-balanced ('above').
    held = summarize_results(_per_seed({"adaptive": UP, "topk-uniform": UP,
                                        "adaptive-topk": [a + 0.05 for a in UP]}), ["t"])
    assert [c["verdicts"] for c in held["claims"]] == [{"t": HELD}] * 4
    d = held["paired"]["t"]["adaptive - entire"]
    half = 2.776 * 0.3 ** 0.5 / 5 ** 0.5  # the differences' sample variance is 0.3; t(4 df) = 2.776
    assert d["differences"] == pytest.approx([5, 6, 5, 6, 5]) and d["wins"] == 5
    assert d["ci95"] == pytest.approx([5.4 - half, 5.4 + half])

    lost = summarize_results(_per_seed({"entire": UP, "hand-picked": UP, "reversed": UP,
                                        "class-balanced": MIXED}), ["t"])
    assert [c["verdicts"]["t"] for c in lost["claims"]] == [FALSIFIED, FALSIFIED, FALSIFIED, NOT_SHOWN]

    unclear = summarize_results(_per_seed({"adaptive": MIXED, "topk-uniform": UP,
                                           "adaptive-topk": [u + m - 0.80 for u, m in zip(UP, MIXED)]}), ["t"])
    # an interval that includes 0 shows nothing for an 'above' claim, and does not falsify 'not-below'
    assert [c["verdicts"]["t"] for c in unclear["claims"]] == [NOT_SHOWN, HELD, NOT_SHOWN, NOT_SHOWN]

    one_seed = summarize_results(_records({}, seeds=[0]), ["t"])
    assert all(c["verdicts"]["t"].startswith("not measured") for c in one_seed["claims"])


# -- quick mode end to end -----------------------------------------------------------------


def test_quick_mode_end_to_end_and_rerun_reuses(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "adaptive_transfer.experiment", "--quick", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out / "report"
    results = json.loads((report / "results.json").read_text())
    runs = results["runs"]
    main = [r for r in runs if not r["figure3"]]
    assert {(r["target"], r["arm"]) for r in main} == {(t.name, a) for t in P.QUICK.targets for a, _ in P.ARMS}
    assert {r["size"] for r in runs if r["figure3"]} | {P.QUICK.size} == set(P.QUICK.figure3_sizes)
    n = P.QUICK.world.num_classes * P.QUICK.world.test_per_class
    assert all(r["test_images"] == n for r in runs)
    for r in runs:
        # top-1 is a count of the n test images; every class has as many test images, so the
        # mean per-class accuracy is the top-1 itself
        correct = round(r["top1"] * n)
        assert 0 <= correct <= n and r["top1"] == pytest.approx(correct / n, abs=1e-12), r
        assert r["mean_per_class"] == pytest.approx(r["top1"], abs=1e-12), r
    by = {(r["target"], r["arm"]): r for r in main}
    # the selections differ as their schemes say: elastic and entire never repeat an example
    assert by[("food", "elastic")]["unique_examples"] == P.QUICK.size
    assert by[("food", "entire")]["unique_examples"] == P.QUICK.size
    assert by[("animal", "wrong-domain")]["share_on_target_leaves"] < by[("animal", "hand-picked")][
        "share_on_target_leaves"]
    _check_quick_summary(results["summary"], runs)
    text = (report / "report.md").read_text()
    for needle in ("Falsified if", "Paired differences", "Figure 3", "Mass on the target's true leaves"):
        assert needle in text
    assert (report / "accuracy.png").stat().st_size > 0 and (report / "figure3.png").stat().st_size > 0
    assert {p.name for p in out.iterdir()} == {"data", "report", "seed-0"}

    assert results["stages"]["built"] > 0
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((report / "results.json").read_text())
    # every stage output is reused (the one reuse rule), and the records are the same
    assert rerun["stages"] == {"built": 0, "reused": results["stages"]["built"] + results["stages"]["reused"]}
    assert rerun["runs"] == runs


#: The paired differences the report gives for every target: name -> (arm a, arm b), a - b.
PAIRS = {
    "adaptive - entire": ("adaptive", "entire"),
    "adaptive - hand-picked": ("adaptive", "hand-picked"),
    "adaptive - uniform": ("adaptive", "topk-uniform"),
    "adaptive top-k - uniform": ("adaptive-topk", "topk-uniform"),
    "uniform - reversed": ("topk-uniform", "reversed"),
    "adaptive - class-balanced": ("adaptive", "class-balanced"),
    "hand-picked - wrong-domain": ("hand-picked", "wrong-domain"),
    "entire - random-init": ("entire", "random-init"),
}


def _check_quick_summary(summary: dict, runs: list[dict]) -> None:
    """The summary in results.json, recomputed plainly from the per-seed
    records: with one seed every mean is that seed's value (in points), and
    there is no spread, no interval and no verdict."""
    targets = [t.name for t in P.QUICK.targets]
    assert set(summary["arms"]) == set(summary["paired"]) == set(targets)
    for t in targets:
        rec = {r["arm"]: r for r in runs if r["target"] == t and not r["figure3"]}
        assert set(summary["arms"][t]) == set(rec) == {arm for arm, _ in P.ARMS}
        for arm, r in rec.items():
            s = summary["arms"][t][arm]
            assert (s["top1"]["n"], s["top1"]["std"], s["top1"]["ci95"]) == (1, None, None)
            assert s["top1"]["mean"] == pytest.approx(100 * r["top1"])
            assert s["mean_per_class"]["mean"] == pytest.approx(100 * r["mean_per_class"])
            assert (s["unique_examples"], s["share_on_target_leaves"], s["test_images"]) == (
                r["unique_examples"], r["share_on_target_leaves"], r["test_images"])
            p = r["top1"]
            assert s["binomial_sd"] == pytest.approx(100 * (p * (1 - p) / r["test_images"]) ** 0.5)
        assert set(summary["paired"][t]) == set(PAIRS)
        for name, (a, b) in PAIRS.items():
            d, diff = summary["paired"][t][name], 100 * (rec[a]["top1"] - rec[b]["top1"])
            assert (d["seeds"], d["wins"], d["ci95"]) == ([0], int(diff > 0), None), name
            assert d["differences"] == pytest.approx([diff]) and d["mean"] == pytest.approx(diff), name
    # Figure 3: the target's same and elastic sets at every size, the main size included.
    fig_target = P.QUICK.figure3_target
    sweep = {(r["arm"], r["size"]): r for r in runs
             if r["target"] == fig_target and r["arm"] in ("adaptive", "elastic")}
    assert {(a, s) for a in ("adaptive", "elastic") for s in P.QUICK.figure3_sizes} == set(sweep)
    assert set(summary["figure3"]) == {fig_target}
    fig = summary["figure3"][fig_target]
    assert {(arm, int(size)) for arm in fig for size in fig[arm]} == set(sweep)
    for (arm, size), r in sweep.items():
        point = fig[arm][str(size)]  # JSON object keys are strings
        assert point["top1"]["mean"] == pytest.approx(100 * r["top1"])
        assert point["unique_examples"] == r["unique_examples"]
    assert [c["verdicts"] for c in summary["claims"]] == [
        {t: "not measured (one seed: no interval)" for t in targets}] * 4


# -- the pre-registered tests (stats.paired_t_test, holm, directional_decisions) ----------------


def test_paired_t_test_against_a_null_and_without_spread():
    from adaptive_transfer.experiment.stats import paired_t_test

    r = paired_t_test([1.0, 2.0, 3.0])
    # mean 2, sd 1, t = 2 / (1 / sqrt 3), 2 df: two-sided p 0.0742 (tables)
    assert (r["n"], r["df"], r["mean"]) == (3, 2, 2.0) and r["t"] == pytest.approx(3 ** 0.5 * 2)
    assert r["p"] == pytest.approx(0.0742, abs=5e-4)
    # against the competitive margin: the same differences, null -1
    assert paired_t_test([1.0, 2.0, 3.0], null=-1.0)["t"] == pytest.approx(3 * 3 ** 0.5)
    assert paired_t_test([0.5, 0.5], null=0.5)["p"] == 1.0 and paired_t_test([0.5, 0.5])["p"] == 0.0
    with pytest.raises(ValueError):
        paired_t_test([1.0])


def test_holm_step_down_and_directions():
    from adaptive_transfer.experiment.stats import directional_decisions, holm

    # sorted 0.01, 0.03, 0.04 scaled by 3, 2, 1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []
    with pytest.raises(ValueError):
        holm([0.1, 1.5])
    tests = [{"mean": 2.0, "null": 0.0, "p": 0.001}, {"mean": -3.0, "null": -1.0, "p": 0.004},
             {"mean": 1.0, "null": 0.0, "p": 0.06}]
    out = directional_decisions(tests)
    # adjusted 0.003, 0.008, 0.06: the first two rejected, each in the direction of mean - null
    assert [d["decision"] for d in out] == ["above", "below", "none"]
    assert [d["p_holm"] for d in out] == pytest.approx([0.003, 0.008, 0.06])


PRE_NOT_SHOWN = "not shown (Holm-adjusted p >= 0.05)"


def test_preregistered_verdicts_and_units_over_draws():
    held = summarize_results(_per_seed({"adaptive": UP, "topk-uniform": UP,
                                        "adaptive-topk": [a + 0.05 for a in UP]}), ["t"])
    assert [c["preregistered"] for c in held["claims"]] == [{"t": "held"}] * 4
    assert len(held["preregistered_tests"]) == 5 and "by_draw" not in held
    lost = summarize_results(_per_seed({"entire": UP, "hand-picked": UP, "reversed": UP,
                                        "class-balanced": MIXED}), ["t"])
    assert [c["preregistered"]["t"] for c in lost["claims"]] == ["falsified"] * 3 + [PRE_NOT_SHOWN]
    # competitive: 0.5 points below hand-picked on every seed (with spread) is above the -1 margin
    near = [h - 0.005 + 0.001 * (s % 2) for s, h in enumerate([0.80] * 5)]
    close = summarize_results(_per_seed({"adaptive": near}), ["t"])
    test = next(x for x in close["preregistered_tests"] if x["comparison"] == "adaptive - hand-picked")
    assert test["null"] == -1.0 and test["decision"] == "above" and close["claims"][1]["preregistered"] == {"t": "held"}
    # two draws: a unit is a (draw, seed); the per-draw differences are kept for the replication
    two = [dict(r, draw=d) for d in (0, 1) for r in _per_seed({"adaptive": UP})]
    s = summarize_results(two, ["t"])
    d = s["paired"]["t"]["adaptive - entire"]
    assert d["n"] == 10 and d["seeds"][:2] == ["d0-s0", "d0-s1"] and set(s["by_draw"]) == {"0", "1"}
    assert s["by_draw"]["1"]["t"]["adaptive - entire"]["differences"] == pytest.approx([5, 6, 5, 6, 5])


def test_real_configs_and_weights_keys():
    from adaptive_transfer.experiment.worlds import MissingData

    assert P.configs("generated", False) is P.FULL and P.configs("generated", True) is P.QUICK
    real = P.configs("real", False, cache="/nowhere")
    assert real.world.cache == "/nowhere" and real.draws == (0, 1) and len(real.seeds) >= 5 and real.dedup
    assert {t.branch for t in real.targets} == {t.wrong_branch for t in real.targets}  # each root once each way
    with pytest.raises(MissingData, match="make real-data"):
        real.world.require_data()
    with pytest.raises(ValueError, match="--data"):
        P.configs("imagenet", False)
    with pytest.raises(ValueError, match="one draw"):
        dataclasses.replace(P.FULL, draws=(0, 1))
    assert P.WeightsSpec("food").key == "food" and P.WeightsSpec("food", oracle=True).key == "food-oracle"
    assert P.WeightsSpec("food", temperature=1.0, generalist_steps=300).key == "food-T1-g300"


def test_hypothesis_runs_are_variants_apart_from_the_main_table():
    runs = P.hypothesis_runs(P.QUICK, 2, P.HYPOTHESES)
    assert {r.condition for r in runs} == {"oracle", "leaves", "T1", "T4", f"g{P.QUICK.generalist_steps // 4}"}
    main = {s.slug for s in P.unique_sets(P.finetune_runs(P.QUICK, 2))}
    assert not main & {r.init.slug for r in runs}  # never reuses (or overwrites) a main-table set
    leaves = [r for r in runs if r.condition == "leaves"]
    assert {(r.target, r.arm, r.init.leaves_of, r.init.scheme) for r in leaves} == {
        (t.name, "hand-picked", t.name, "subset") for t in P.QUICK.targets}
    oracle = [r.init.weights for r in runs if r.condition == "oracle"]
    assert oracle and all(w.oracle and w.key.endswith("-oracle") for w in oracle)
    with pytest.raises(ValueError, match="unknown hypotheses"):
        P.hypothesis_runs(P.QUICK, 0, ("size",))


def test_report_writes_every_section_from_records(tmp_path):
    from adaptive_transfer.experiment.report import write_report

    records = [dict(r, draw=d, condition="", max_copies=3) for d in (0, 1) for r in _per_seed({"adaptive": UP})]
    records += [dict(r, draw=d, arm="hand-picked", condition="leaves", max_copies=2)
                for d in (0, 1) for r in _per_seed({}) if r["arm"] == "hand-picked"]
    g = {"entropy_bits": 3.0, "uniform_entropy_bits": 5.0, "mass_on_target_leaves": 0.5, "target_leaves": 4,
         "labels": 32, "top_labels": [["x", 0.2]]}
    dedup = {"targets": {"t": {"threshold": 0.9, "source_examples_compared": 100, "excluded": 3,
                               "excluded_by_split": {}, "target_images": 50, "target_images_with_duplicates": 2}},
             "excluded_union": 3}
    meta = {"command": "c", "commit": "x", "finished": "now", "machine": "m", "minutes": 1.0,
            "stages": {"built": 1, "reused": 0}, "labels": 32, "setup": ["Source: s."],
            "config": {"targets": [{"name": "t", "analogue": "a", "branch": "b"}], "world": {"kind": "real"},
                       "draws": [0, 1], "seeds": [0, 1, 2, 3, 4], "size": 100, "pretrain_steps": 1,
                       "pretrain_batch": 1, "finetune_steps": 1, "finetune_batch": 1, "top_k": 2,
                       "generalist_steps": 1},
            "generalist": {"0": {"t": g}, "1": {"t": g}}, "near_duplicates": {"0": dedup, "1": {}},
            "data": {"0": {"duplicates_dropped": 7, "source_examples": 100}}}
    summary = write_report(str(tmp_path), records, meta)
    text = (tmp_path / "report.md").read_text()
    for needle in ("real data", "Near-duplicates", "| 0 | union |", "Pre-registered: t: **held**", "Holm p",
                   "Replication over data draws", "hand-picked (leaves)", "7 exact duplicate"):
        assert needle in text, needle
    assert summary["arms"]["t"]["hand-picked"]["top1"]["n"] == 10  # the variant is kept out of the main arm
    assert summary["hypotheses"]["t"]["hand-picked (leaves)"]["max_copies"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["claims"] == json.loads(
        json.dumps(summary["claims"]))


def test_sets_are_built_in_the_preregistered_priority():
    runs = P.finetune_runs(P.FULL, 0) + P.hypothesis_runs(P.FULL, 0, ("leaves",))
    order = P.by_priority(runs)
    assert set(order) == {r.init for r in runs if r.init} and len(order) == len(set(order))
    first_arm = {}
    for r in runs:
        if r.init is not None and not r.condition and not r.figure3:
            first_arm.setdefault(r.init, min((P.PRIORITY.index(x.arm) for x in runs
                                              if x.init == r.init and not x.condition), default=99))
    ranks = [first_arm.get(s, 99) for s in order]
    assert ranks == sorted(ranks) and order[0].name == "entire"
    assert order[-1].leaves_of is not None or any(r.figure3 for r in runs if r.init == order[-1])


def _same_numbers(stored, recomputed, path="summary") -> list[str]:
    """Where ``recomputed`` differs from ``stored`` (every key ``stored``
    holds; floats to 1e-9)."""
    if isinstance(stored, dict):
        if not isinstance(recomputed, dict):
            return [path]
        return [d for k in stored for d in _same_numbers(stored[k], recomputed.get(k), f"{path}/{k}")]
    if isinstance(stored, list):
        if not isinstance(recomputed, list) or len(stored) != len(recomputed):
            return [path]
        return [d for i, (a, b) in enumerate(zip(stored, recomputed)) for d in _same_numbers(a, b, f"{path}[{i}]")]
    if isinstance(stored, float) and isinstance(recomputed, (int, float)):
        return [] if math.isclose(stored, recomputed, rel_tol=1e-9, abs_tol=1e-9) else [path]
    return [] if stored == recomputed else [path]


@pytest.mark.parametrize("run", sorted(p.name for p in (Path(ROOT) / "docs" / "experiments").iterdir()
                                       if (p / "results.json").exists()))
def test_a_committed_runs_summary_recomputes_from_its_per_unit_runs(run):
    """The figures in docs come from committed data: each committed run's
    summary is what summarize_results makes of its per-unit records."""
    results = json.loads((Path(ROOT) / "docs" / "experiments" / run / "results.json").read_text())
    targets = [t["name"] for t in results["config"]["targets"]]
    recomputed = json.loads(json.dumps(summarize_results(results["runs"], targets)))
    assert results["runs"] and _same_numbers(results["summary"], recomputed) == []
