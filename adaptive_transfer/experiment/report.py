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
from .stats import binomial_sd, paired_difference, summarize

__all__ = ["COMPARISONS", "CLAIMS", "summarize_results", "write_report"]

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


def _pct(records: Sequence[dict], metric: str = "top1") -> dict[int, float]:
    return {r["seed"]: 100.0 * r[metric] for r in records}


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
        main = [r for r in records if r["target"] == t and not r["figure3"]]
        arms = {}
        for arm, _ in ARMS:
            rs = [r for r in main if r["arm"] == arm]
            if not rs:
                continue
            top1 = summarize(_pct(rs).values())
            n = rs[0]["test_images"]
            arms[arm] = {"top1": top1, "mean_per_class": summarize(_pct(rs, "mean_per_class").values()),
                         "unique_examples": _mean(r["unique_examples"] for r in rs),
                         "share_on_target_leaves": _mean(r["share_on_target_leaves"] for r in rs),
                         "test_images": n, "binomial_sd": 100.0 * binomial_sd(top1["mean"] / 100.0, n)}
        out["arms"][t] = arms
        by_arm = {arm: _pct([r for r in main if r["arm"] == arm]) for arm in arms}
        out["paired"][t] = {name: paired_difference(by_arm[a], by_arm[b]) for name, a, b in COMPARISONS
                            if a in by_arm and b in by_arm}
        sweep = [r for r in records if r["target"] == t and r["arm"] in ("adaptive", "elastic")]
        fig = {}
        for r in sweep:
            fig.setdefault(r["arm"], {}).setdefault(r["size"], []).append(r)
        if any(r["figure3"] for r in sweep):
            out["figure3"][t] = {arm: {size: {"top1": summarize(_pct(rs).values()),
                                              "unique_examples": _mean(r["unique_examples"] for r in rs)}
                                       for size, rs in sorted(sizes.items())}
                                 for arm, sizes in fig.items()}
    for claim, names, falsifier, rule in CLAIMS:
        per_target = {}
        for t in targets:
            diffs = [out["paired"][t][n] for n in names if n in out["paired"][t]]
            if len(diffs) == len(names):
                per_target[t] = _verdict(diffs, rule)
        out["claims"].append({"claim": claim, "comparisons": list(names), "falsified_if": falsifier,
                              "verdicts": per_target})
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
        top.set_title(f"Figure 3 on generated data (target: {t})")
        bottom.set_ylabel("unique examples")
        bottom.set_xlabel("pre-training set size (samples)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "figure3.png"), dpi=110)
        plt.close(fig)
        written.append("figure3.png")
    return written


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
    cfg = meta["config"]
    names = dict(ARMS)
    seeds = cfg["seeds"]
    target_list = ", ".join(f"`{t['name']}` ({t['analogue']}; branch {t['branch']})" for t in cfg["targets"])
    lines = [
        "# Domain adaptive transfer on generated data: arms, seeds and intervals", "",
        f"Command: `{meta['command']}`  ", f"Commit: `{meta['commit']}`  ",
        f"Finished {meta['finished']} on {meta['machine']}; this invocation took {meta['minutes']:.0f} minutes, "
        f"built {meta['stages']['built']} stages and reused {meta['stages']['reused']} (finished earlier from the "
        "same fingerprints).", "",
        "## Setup", "",
        f"- Source: {cfg['source']['num_examples']:,} generated examples, {meta['labels']} labels "
        f"(a 3-level hierarchy, Zipf class sizes, a quarter of the examples also carry an ancestor label).",
        f"- Targets: {target_list}; "
        f"{cfg['num_classes']} classes each ({round(cfg['num_classes'] * cfg['branch_fraction'])} from the branch), "
        f"{cfg['train_per_class']} training and {cfg['test_per_class']} test images per class, domain shift "
        f"{cfg['domain_shift']}.",
        f"- Every pre-training set has {cfg['size']:,} samples; {cfg['pretrain_steps']} pre-training steps of "
        f"batch {cfg['pretrain_batch']} and {cfg['finetune_steps']} fine-tuning steps of batch "
        f"{cfg['finetune_batch']} (a small CNN, CPU), the same for every arm. Top-k: k = {cfg['top_k']}.",
        f"- Seeds {', '.join(map(str, seeds))}: each varies the resampling, pre-training and fine-tuning. "
        f"The data and the generalist ({cfg['generalist_steps']} steps on the entire source) are the same for "
        "every seed.",
        "- Intervals: 95% Student-t over seeds. Paired differences are per seed (same seed, same target).", "",
        "## The generalist's P_t", "",
        "| Target | Entropy (bits) | Uniform (bits) | Mass on the target's true leaves | Top labels |",
        "|---|---:|---:|---:|---|"]
    for t in targets:
        g = meta["generalist"][t]
        top = ", ".join(f"{n} {p:.2f}" for n, p in g["top_labels"])
        lines.append(f"| {t} | {g['entropy_bits']:.2f} | {g['uniform_entropy_bits']:.2f} | "
                     f"{g['mass_on_target_leaves']:.2f} ({g['target_leaves']} leaves) | {top} |")
    lines += ["", "## Target top-1 (%) by pre-training set: mean ± std over seeds", "",
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
        a0 = next(iter(summary["arms"][t].values()))
        lines.append(f"\n{a0['test_images']:,} test images: the test set's binomial noise alone is about "
                     f"±{a0['binomial_sd']:.2f} points at {a0['top1']['mean']:.0f}%.")
    lines += ["", "## Paired differences (points of top-1): mean [95% interval] (seeds where the first is ahead)",
              "", "| Difference | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for name, _, _ in COMPARISONS:
        cells = []
        for t in targets:
            d = summary["paired"][t].get(name)
            cells.append("—" if d is None else f"{d['mean']:+.1f} {_fmt_ci(d)} ({d['wins']}/{d['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    lines += ["", "## The claims, what would falsify them, and whether they held", ""]
    for c in summary["claims"]:
        verdicts = "; ".join(f"{t}: **{v}**" for t, v in c["verdicts"].items())
        lines.append(f"- **{c['claim']}.** Falsified if {c['falsified_if']}. {verdicts}.")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots) + ". Every per-seed number is in "
              "`results.json` (`runs`); `summary` is recomputed from them by "
              "`adaptive_transfer.experiment.report.summarize_results`.", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write("\n".join(lines))
    return summary
