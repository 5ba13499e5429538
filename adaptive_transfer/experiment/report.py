"""The experiment's summary, report and plots, from its per-seed records.

:func:`summarize_results` is pure (records -> summary dict); anyone can
recompute it from ``results.json``'s ``runs``. :func:`write_report` writes
``report.md``, ``results.json``, ``accuracy.png`` and ``figure3.png``.
Accuracies in the summary and report are percentages.
"""

from __future__ import annotations

import os
from typing import Sequence

from schemas import io as sio

from .plan import ARMS
from .stats import binomial_sd, directional_decisions, paired_difference, paired_t_test, summarize

__all__ = ["COMPARISONS", "CLAIMS", "MARGIN", "ALPHA", "PREREGISTERED", "summarize_results", "write_report"]

#: Paired per-seed differences reported for every target: (name, arm a, arm b).
COMPARISONS = (
    ("adaptive - entire", "adaptive", "entire"),
    ("adaptive - hand-picked", "adaptive", "hand-picked"),
    ("adaptive - uniform", "adaptive", "topk-uniform"),
    ("adaptive top-k - uniform", "adaptive-topk", "topk-uniform"),
    ("uniform - reversed", "topk-uniform", "reversed"),
    ("adaptive - class-balanced", "adaptive", "class-balanced"),
    ("hand-picked - wrong-domain", "hand-picked", "wrong-domain"),
    ("entire - random-init", "entire", "random-init"),
)

#: The paper's claims: (claim, the comparisons it rests on, what would falsify it, the rule).
#: 'above': held if every interval lies above 0, falsified if one lies wholly below 0,
#: otherwise not shown; 'not-below': falsified if an interval lies wholly below 0, else held.
CLAIMS = (
    ("Adaptive transfer beats pre-training on the entire source", ("adaptive - entire",),
     "the 95% interval of adaptive - entire lies wholly below 0; shown only if it lies wholly above 0", "above"),
    ("Adaptive transfer is competitive with the hand-picked subset (not clearly below it)",
     ("adaptive - hand-picked",), "the 95% interval of adaptive - hand-picked lies wholly below 0 (held otherwise)",
     "not-below"),
    ("The adaptive weights matter within the top-k labels: reversed < uniform < adaptive (Table 6)",
     ("uniform - reversed", "adaptive top-k - uniform"),
     "either interval (uniform - reversed, adaptive top-k - uniform) lies wholly below 0; shown only if both lie "
     "wholly above 0", "above"),
    ("The gain comes from relevance, not from rebalancing: adaptive > class-balanced",
     ("adaptive - class-balanced",),
     "the 95% interval of adaptive - class-balanced lies wholly below 0; shown only if it lies wholly above 0",
     "above"),
)


#: "Competitive": adaptive is at most this many points of top-1 below the hand-picked subset.
MARGIN = 1.0
#: The family-wise error rate of the pre-registered tests (Holm over every target's tests).
ALPHA = 0.05

#: The pre-registered tests (docs/experiments/2026-12-06-real-plan.md): per claim of CLAIMS (same
#: order), the paired differences it rests on and each one's null value (points of top-1). A claim
#: is held where every one of its tests rejects its null upwards after Holm, falsified where one
#: rejects downwards, otherwise not shown.
PREREGISTERED = (
    (("adaptive - entire", 0.0),),
    (("adaptive - hand-picked", -MARGIN),),
    (("adaptive top-k - uniform", 0.0), ("uniform - reversed", 0.0)),
    (("adaptive - class-balanced", 0.0),),
)


def _unit(r: dict, multi: bool):
    """A record's unit of replication: its seed, or ``d<draw>-s<seed>`` when there are several draws."""
    return f"d{r.get('draw', 0)}-s{r['seed']}" if multi else r["seed"]


def _pct(records: Sequence[dict], metric: str = "top1") -> dict:
    multi = len({r.get("draw", 0) for r in records}) > 1
    return {_unit(r, multi): 100.0 * r[metric] for r in records}


def _hypotheses(records: Sequence[dict], by_arm: dict) -> dict:
    """The hypotheses' runs of one target by ``arm (condition)``: top-1, unique
    examples, largest copies of one example, share on the target's leaves, and
    the paired differences with the main table's adaptive and hand-picked arms."""
    out = {}
    for key in dict.fromkeys((r["arm"], r["condition"]) for r in records):
        rs = [r for r in records if (r["arm"], r["condition"]) == key]
        pct = _pct(rs)
        out[f"{key[0]} ({key[1]})"] = {
            "top1": summarize(pct.values()), "unique_examples": _mean(r["unique_examples"] for r in rs),
            "max_copies": max(r.get("max_copies", 0) for r in rs),
            "share_on_target_leaves": _mean(r["share_on_target_leaves"] for r in rs),
            "minus": {arm: paired_difference(pct, by_arm[arm]) for arm in ("adaptive", "hand-picked")
                      if arm in by_arm and set(pct) & set(by_arm[arm])}}
    return out


def preregistered_verdicts(paired: dict, targets: Sequence[str], alpha: float = ALPHA) -> dict:
    """The pre-registered decisions: each test of :data:`PREREGISTERED` on
    each target a paired t-test against its null, Holm-adjusted over the
    whole family; ``{"tests": [...], "verdicts": [{target: verdict}, ...]}``
    (verdicts in the order of :data:`CLAIMS`; nothing where fewer than 2 units)."""
    keys, tests = [], []
    for c, claim_tests in enumerate(PREREGISTERED):
        for name, null in claim_tests:
            for t in targets:
                d = paired.get(t, {}).get(name)
                if d is not None and d["n"] >= 2:
                    keys.append((c, t, name))
                    tests.append(paired_t_test(d["differences"], null))
    decided = directional_decisions(tests, alpha) if tests else []
    by = {k: d for k, d in zip(keys, decided)}
    verdicts = []
    for c, claim_tests in enumerate(PREREGISTERED):
        per_target = {}
        for t in targets:
            ds = [by.get((c, t, name)) for name, _ in claim_tests]
            if any(d is None for d in ds):
                continue
            if any(d["decision"] == "below" for d in ds):
                per_target[t] = "falsified"
            elif all(d["decision"] == "above" for d in ds):
                per_target[t] = "held"
            else:
                per_target[t] = "not shown (Holm-adjusted p >= 0.05)"
        verdicts.append(per_target)
    return {"tests": [{"claim": c, "target": t, "comparison": n, **d} for (c, t, n), d in by.items()],
            "verdicts": verdicts}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _verdict(diffs: list[dict], rule: str) -> str:
    if any(d["ci95"] is None for d in diffs):
        return "not measured (one seed: no interval)"
    if rule == "above":
        if all(d["ci95"][0] > 0 for d in diffs):
            return "held"
        return "falsified" if any(d["ci95"][1] < 0 for d in diffs) else "not shown (an interval includes 0)"
    if rule == "not-below":
        return "falsified" if any(d["ci95"][1] < 0 for d in diffs) else "held"
    raise ValueError(f"unknown rule {rule!r}")


def summarize_results(records: Sequence[dict], targets: Sequence[str]) -> dict:
    """Per target: each arm's top-1 and mean per-class summaries, unique
    examples, share of draws on the target's leaves and test-set noise; the
    paired differences; Figure 3 by matcher and size; the claims' verdicts."""
    out: dict = {"arms": {}, "paired": {}, "figure3": {}, "claims": []}
    for t in targets:
        main = [r for r in records if r["target"] == t and not r["figure3"] and not r.get("condition")]
        arms = {}
        for arm, _ in ARMS:
            rs = [r for r in main if r["arm"] == arm]
            if not rs:
                continue
            top1 = summarize(_pct(rs).values())
            n = rs[0]["test_images"]
            arms[arm] = {"top1": top1, "mean_per_class": summarize(_pct(rs, "mean_per_class").values()),
                         "unique_examples": _mean(r["unique_examples"] for r in rs),
                         "max_copies": max((r.get("max_copies", 0) for r in rs), default=0),
                         "share_on_target_leaves": _mean(r["share_on_target_leaves"] for r in rs),
                         "test_images": n, "binomial_sd": 100.0 * binomial_sd(top1["mean"] / 100.0, n)}
        out["arms"][t] = arms
        by_arm = {arm: _pct([r for r in main if r["arm"] == arm]) for arm in arms}
        out["paired"][t] = {name: paired_difference(by_arm[a], by_arm[b]) for name, a, b in COMPARISONS
                            if a in by_arm and b in by_arm}
        hyp = [r for r in records if r["target"] == t and r.get("condition")]
        if hyp:
            out.setdefault("hypotheses", {})[t] = _hypotheses(hyp, by_arm)
        sweep = [r for r in records if r["target"] == t and r["arm"] in ("adaptive", "elastic")
                 and not r.get("condition")]
        fig = {}
        for r in sweep:
            fig.setdefault(r["arm"], {}).setdefault(r["size"], []).append(r)
        if any(r["figure3"] for r in sweep):
            out["figure3"][t] = {arm: {size: {"top1": summarize(_pct(rs).values()),
                                              "unique_examples": _mean(r["unique_examples"] for r in rs)}
                                       for size, rs in sorted(sizes.items())}
                                 for arm, sizes in fig.items()}
    pre = preregistered_verdicts(out["paired"], targets)
    out["preregistered_tests"] = pre["tests"]
    for (claim, names, falsifier, rule), pre_verdicts in zip(CLAIMS, pre["verdicts"]):
        per_target = {}
        for t in targets:
            diffs = [out["paired"][t][n] for n in names if n in out["paired"][t]]
            if len(diffs) == len(names):
                per_target[t] = _verdict(diffs, rule)
        out["claims"].append({"claim": claim, "comparisons": list(names), "falsified_if": falsifier,
                              "verdicts": per_target, "preregistered": pre_verdicts})
    draws = sorted({r.get("draw", 0) for r in records})
    if len(draws) > 1:
        out["by_draw"] = {str(d): summarize_results([r for r in records if r.get("draw", 0) == d], targets)["paired"]
                          for d in draws}
    return out


def _fmt_summary(s: dict) -> str:
    if s["std"] is None:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def _fmt_ci(s: dict) -> str:
    return "—" if s["ci95"] is None else f"[{s['ci95'][0]:+.1f}, {s['ci95'][1]:+.1f}]"


def _plots(summary: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    targets = list(summary["arms"])
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4.2), squeeze=False)
    for ax, t in zip(axes[0], targets):
        arms = list(summary["arms"][t])
        if not arms:
            ax.set_title(f"target: {t} (no run finished)")
            ax.set_axis_off()
            continue
        means = [summary["arms"][t][a]["top1"]["mean"] for a in arms]
        errs = [0 if summary["arms"][t][a]["top1"]["ci95"] is None else
                summary["arms"][t][a]["top1"]["ci95"][1] - summary["arms"][t][a]["top1"]["mean"] for a in arms]
        ax.bar(range(len(arms)), means, yerr=errs, capsize=3, color="#4477aa")
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(max(0, min(means) - 10), min(100, max(means) + 5))
        ax.set_title(f"target: {t}")
        ax.set_ylabel("top-1 (%), mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)
    plt.close(fig)
    written.append("accuracy.png")
    for t, curves in summary["figure3"].items():
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True)
        for arm, label in (("adaptive", "same distribution matcher"), ("elastic", "elastic distribution matcher")):
            sizes = sorted(curves.get(arm, {}))
            if not sizes:
                continue
            m = [curves[arm][s]["top1"]["mean"] for s in sizes]
            e = [0 if curves[arm][s]["top1"]["ci95"] is None else curves[arm][s]["top1"]["ci95"][1] - v
                 for s, v in zip(sizes, m)]
            top.errorbar(sizes, m, yerr=e, marker="o", capsize=3, label=label)
            bottom.plot(sizes, [curves[arm][s]["unique_examples"] for s in sizes], marker="o", label=label)
        top.set_ylabel("target top-1 (%)")
        top.legend(fontsize=8)
        top.set_title(f"Figure 3 (target: {t})")
        bottom.set_ylabel("unique examples")
        bottom.set_xlabel("pre-training set size (samples)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "figure3.png"), dpi=110)
        plt.close(fig)
        written.append("figure3.png")
    return written


def _by_draw(generalist: dict, targets: Sequence[str]) -> dict:
    """``meta['generalist']`` by draw (an older run's is by target only: draw 0)."""
    return {"0": generalist} if set(targets) <= set(generalist) else generalist


def _split_counts(x) -> str:
    """A count, or counts by split (``train 40, test 1200``)."""
    return ", ".join(f"{k} {v}" for k, v in x.items()) if isinstance(x, dict) else str(x)


def _dedup_lines(meta: dict) -> list[str]:
    """The near-duplicate stage's summary per draw and target (nothing where it did not run)."""
    found = {d: f for d, f in meta.get("near_duplicates", {}).items() if f}
    if not found:
        return []
    lines = ["## Near-duplicates of the targets' images removed from the source", "",
             "The pipeline's near-duplicate stage (Beam, the generalist's embeddings) compared every target's "
             "train and test images with the source; every source example it matched is excluded from every "
             "pre-training set.", "",
             "| Draw | Target | Threshold | Source compared | Target images | With a near-duplicate | "
             "Source excluded, by the split that matched |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for draw, f in found.items():
        for t, x in f["targets"].items():
            lines.append(f"| {draw} | {t} | {x['threshold']} | {x['source_examples_compared']} | "
                         f"{_split_counts(x['target_images'])} | {_split_counts(x['target_images_with_duplicates'])} | "
                         f"{_split_counts(x['excluded_by_split']) or x['excluded']} ({x['excluded']} distinct) |")
        data = meta.get("data", {}).get(draw, {})
        lines.append(f"| {draw} | union | | | | | {f['excluded_union']} |")
        if data.get("duplicates_dropped") is not None:
            lines.append(f"\nDraw {draw}: {data['duplicates_dropped']} exact duplicate images dropped before the "
                         f"split; {data.get('source_examples')} source examples.")
    return lines + [""]


def write_report(out_dir: str, records: Sequence[dict], meta: dict) -> dict:
    """Write results.json (meta, every per-seed record, the summary),
    report.md and the plots into ``out_dir``; returns the summary."""
    targets = [t["name"] for t in meta["config"]["targets"]]
    summary = summarize_results(records, targets)
    os.makedirs(out_dir, exist_ok=True)
    results = {**meta, "runs": list(records), "summary": summary}
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as fh:
        fh.write(sio.json_text(results, indent=1))
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    plots = _plots(summary, out_dir)
    lines = _header_lines(meta) + _dedup_lines(meta) + _generalist_lines(meta, targets)
    lines += _arm_lines(summary, targets) + _paired_lines(summary, targets) + _hypothesis_lines(summary)
    lines += _figure3_lines(summary) + _claim_lines(summary, targets)
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots) + ". Every per-seed number is in "
              "`results.json` (`runs`); `summary` is recomputed from them by "
              "`adaptive_transfer.experiment.report.summarize_results`.", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write("\n".join(lines))
    return summary


def _header_lines(meta: dict) -> list[str]:
    """The title, the run's provenance and its setup."""
    cfg = meta["config"]
    seeds = cfg["seeds"]
    target_list = ", ".join(f"`{t['name']}` ({t['analogue']}; branch {t['branch']})" for t in cfg["targets"])
    world = cfg["world"]["kind"]
    draws = cfg.get("draws", [0])
    lines = [
        f"# Domain adaptive transfer on {world} data: arms, seeds and intervals", "",
        f"Command: `{meta['command']}`  ", f"Commit: `{meta['commit']}`  ",
        f"Finished {meta['finished']} on {meta['machine']}; this invocation took {meta['minutes']:.0f} minutes, "
        f"built {meta['stages']['built']} stages and reused {meta['stages']['reused']} (finished earlier from the "
        "same fingerprints).", "",
        "## Setup", "",
        *[f"- {line}" for line in meta.get("setup", [])],
        f"- {meta['labels']} labels in the vocabulary. Targets: {target_list}.",
        f"- Every pre-training set has {cfg['size']:,} samples; {cfg['pretrain_steps']} pre-training steps of "
        f"batch {cfg['pretrain_batch']} and {cfg['finetune_steps']} fine-tuning steps of batch "
        f"{cfg['finetune_batch']} (a small CNN, CPU), the same for every arm. Top-k: k = {cfg['top_k']}.",
        f"- Seeds {', '.join(map(str, seeds))}"
        + (f" in each of the data draws {', '.join(map(str, draws))} (a unit is one draw's seed)"
           if len(draws) > 1 else "")
        + ": each seed varies the resampling, pre-training and fine-tuning. The data and the generalist "
        f"({cfg['generalist_steps']} steps on the entire source) are the same for every seed of a draw.",
        "- Intervals: 95% Student-t over units. Paired differences are per unit (same seed, draw and target).",
        f"- Pre-registered tests: paired t-tests, Holm over the whole family at {ALPHA}; \"competitive\" = "
        f"adaptive - hand-picked significantly above -{MARGIN:g} point.", ""]
    return lines


def _generalist_lines(meta: dict, targets: Sequence[str]) -> list[str]:
    """The generalist's P_t per draw and target."""
    lines = ["## The generalist's P_t", "",
              "| Draw | Target | Entropy (bits) | Uniform (bits) | Mass on the target's true leaves | Top labels |",
              "|---:|---|---:|---:|---:|---|"]
    for draw, per_target in _by_draw(meta["generalist"], targets).items():
        for t in targets:
            g = per_target[t]
            top = ", ".join(f"{n} {p:.2f}" for n, p in g["top_labels"])
            lines.append(f"| {draw} | {t} | {g['entropy_bits']:.2f} | {g['uniform_entropy_bits']:.2f} | "
                         f"{g['mass_on_target_leaves']:.2f} ({g['target_leaves']} leaves) | {top} |")
    return lines


def _arm_lines(summary: dict, targets: Sequence[str]) -> list[str]:
    """Top-1 by pre-training set, and each target's arms."""
    names = dict(ARMS)
    lines = ["", "## Target top-1 (%) by pre-training set: mean ± std over seeds", "",
              "| Pre-training set | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for arm, _ in ARMS:
        cells = [_fmt_summary(summary["arms"][t][arm]["top1"]) if arm in summary["arms"][t] else "—"
                 for t in targets]
        lines.append(f"| {names[arm]} | " + " | ".join(cells) + " |")
    for t in targets:
        lines += ["", f"### {t}", "",
                  "| Arm | Top-1 | 95% interval | Mean per-class | Unique examples | Draws on the target's leaves |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm, a in summary["arms"][t].items():
            share = "—" if a["share_on_target_leaves"] is None else f"{100 * a['share_on_target_leaves']:.0f}%"
            ci = "—" if a["top1"]["ci95"] is None else f"{a['top1']['ci95'][0]:.1f} – {a['top1']['ci95'][1]:.1f}"
            lines.append(f"| {arm} | {_fmt_summary(a['top1'])} | {ci} | {_fmt_summary(a['mean_per_class'])} | "
                         f"{a['unique_examples']:,.0f} | {share} |")
        a0 = next(iter(summary["arms"][t].values()), None)
        if a0 is None:
            lines.append("\nNo fine-tuning run of this target finished.")
            continue
        lines.append(f"\n{a0['test_images']:,} test images: the test set's binomial noise alone is about "
                     f"±{a0['binomial_sd']:.2f} points at {a0['top1']['mean']:.0f}%.")
    return lines


def _paired_lines(summary: dict, targets: Sequence[str]) -> list[str]:
    """The paired differences table."""
    lines = ["", "## Paired differences (points of top-1): mean [95% interval] (seeds where the first is ahead)",
              "", "| Difference | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for name, _, _ in COMPARISONS:
        cells = []
        for t in targets:
            d = summary["paired"][t].get(name)
            cells.append("—" if d is None else f"{d['mean']:+.1f} {_fmt_ci(d)} ({d['wins']}/{d['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _hypothesis_lines(summary: dict) -> list[str]:
    """The hypotheses' variants of the arms, per target."""
    lines: list[str] = []
    for t, rows in summary.get("hypotheses", {}).items():
        lines += ["", f"## Hypotheses ({t}): variants of the arms", "",
                  "| Arm (variant) | Top-1 | Unique | Max copies | On the target's leaves | minus adaptive | "
                  "minus hand-picked |", "|---|---:|---:|---:|---:|---:|---:|"]
        base = summary["arms"][t]
        for arm in ("adaptive", "elastic", "hand-picked"):
            if arm in base:
                a = base[arm]
                share = "—" if a["share_on_target_leaves"] is None else f"{100 * a['share_on_target_leaves']:.0f}%"
                lines.append(f"| {arm} (main) | {_fmt_summary(a['top1'])} | {a['unique_examples']:,.0f} | "
                             f"{a['max_copies']} | {share} | | |")
        for name, h in rows.items():
            share = "—" if h["share_on_target_leaves"] is None else f"{100 * h['share_on_target_leaves']:.0f}%"
            minus = [("—" if arm not in h["minus"] else f"{h['minus'][arm]['mean']:+.1f} {_fmt_ci(h['minus'][arm])}")
                     for arm in ("adaptive", "hand-picked")]
            lines.append(f"| {name} | {_fmt_summary(h['top1'])} | {h['unique_examples']:,.0f} | {h['max_copies']} | "
                         f"{share} | {minus[0]} | {minus[1]} |")
    return lines


def _figure3_lines(summary: dict) -> list[str]:
    """Figure 3: same vs elastic matcher by size."""
    lines: list[str] = []
    for t, curves in summary["figure3"].items():
        lines += ["", f"## Figure 3: same vs elastic matcher by size (target {t})", "",
                  "| Size | Same: top-1 | Same: unique | Elastic: top-1 | Elastic: unique |",
                  "|---:|---:|---:|---:|---:|"]
        sizes = sorted(set(curves.get("adaptive", {})) | set(curves.get("elastic", {})), key=int)
        for size in sizes:
            row = [f"{int(size):,}"]
            for arm in ("adaptive", "elastic"):
                c = curves.get(arm, {}).get(size)
                row += ["—", "—"] if c is None else [_fmt_summary(c["top1"]), f"{c['unique_examples']:,.0f}"]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _claim_lines(summary: dict, targets: Sequence[str]) -> list[str]:
    """The claims, their falsifiers and verdicts, the pre-registered tests and the replication over draws."""
    lines = ["", "## The claims, what would falsify them, and whether they held", "",
              "Interval rule (the generated run's): as stated per claim. Pre-registered rule: the tests below, "
              "Holm-adjusted.", ""]
    for c in summary["claims"]:
        verdicts = "; ".join(f"{t}: **{v}**" for t, v in c["verdicts"].items()) or "not measured"
        pre = "; ".join(f"{t}: **{v}**" for t, v in c.get("preregistered", {}).items()) or "not measured"
        lines.append(f"- **{c['claim']}.** Falsified if {c['falsified_if']}. Interval rule: {verdicts}. "
                     f"Pre-registered: {pre}.")
    if summary.get("preregistered_tests"):
        lines += ["", "| Target | Comparison | Null | Mean | t | p | Holm p | Decision |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for x in summary["preregistered_tests"]:
            lines.append(f"| {x['target']} | {x['comparison']} | {x['null']:+g} | {x['mean']:+.2f} | {x['t']:.2f} | "
                         f"{x['p']:.3g} | {x['p_holm']:.3g} | {x['decision']} |")
    if summary.get("by_draw"):
        lines += ["", "## Replication over data draws: paired differences per draw (mean [95% interval])", "",
                  "| Draw | Difference | " + " | ".join(targets) + " |", "|---:|---|" + "---:|" * len(targets)]
        for draw, paired in summary["by_draw"].items():
            for name, _, _ in COMPARISONS:
                cells = [("—" if paired[t].get(name) is None else
                          f"{paired[t][name]['mean']:+.1f} {_fmt_ci(paired[t][name])}") for t in targets]
                lines.append(f"| {draw} | {name} | " + " | ".join(cells) + " |")
    return lines
