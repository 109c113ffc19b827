"""Turn an experiment folder of ``scripts/loop_experiment.py`` into the published pair of files:
``PREFIX.json`` (every raw cell, so anyone can recompute the intervals) and ``PREFIX.md`` (the
tables), with a hand-written discussion appended from ``--notes``.

    python scripts/publish_results.py runs/fmnist docs/results/fashion-mnist --notes notes.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from i2x.loop.experiments import arm_stages, load_results, paired_interval, summarize

EXPLANATION = {"curated", "perturbed", "transplanted", "reweighted", "penalized"}


def _off_pair(cell: dict, a: int, b: int) -> int:
    conf = cell["confusion"]
    m = len(conf)
    return sum(conf[i][j] for i in range(m) for j in range(m) if i != j) - cell["pair_confusions"]


def _iv(c: dict, d: int = 1) -> str:
    if c["lo"] is None:
        return f"{c['mean']:+.{d}f}"
    star = " **\\***" if c["excludes_zero"] else ""
    return f"{c['mean']:+.{d}f} [{c['lo']:+.{d}f}, {c['hi']:+.{d}f}]{star}"


def tables(results: dict, extra: dict) -> tuple[str, dict]:
    a, b = results["pair"]
    na, nb = results["pair_names"]
    s = summarize(results)
    arms = [arm for arm in results["arms"] if arm in s]
    lines = ["| arm | seeds | accuracy % | pair confusions | " + f"{na} as {nb} | {nb} as {na} | other errors |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        e = s[arm]
        cells = list(results["arms"][arm]["seeds"].values())
        off = statistics.fmean(_off_pair(c, a, b) for c in cells)
        acc_sd = "" if e["accuracy_std"] is None else f" +- {100 * e['accuracy_std']:.2f}"
        pc_sd = "" if e["pair_confusions_std"] is None else f" +- {e['pair_confusions_std']:.1f}"
        lines.append(f"| `{arm}` | {len(e['seeds'])} | {100 * e['accuracy_mean']:.2f}{acc_sd} | "
                     f"{e['pair_confusions_mean']:.1f}{pc_sd} | {e['a_as_b_mean']:.1f} | {e['b_as_a_mean']:.1f} | {off:.1f} |")
    table = "\n".join(lines)

    comp = ["| arm | vs | pair confusions | relative | accuracy (points) | other errors | gap recovered |",
            "|---|---|---|---|---|---|---|"]
    checks = {}
    for arm in arms:
        for ref, c in s[arm]["comparisons"].items():
            seeds = c["seeds"]
            doff = [_off_pair(results["arms"][arm]["seeds"][str(x)], a, b) -
                    _off_pair(results["arms"][ref]["seeds"][str(x)], a, b) for x in seeds]
            rel = "-" if c["relative_pair_confusions"] is None else f"{100 * c['relative_pair_confusions']:+.1f}%"
            gap = _iv(s[arm]["gap_recovered"], 2) if ref == "clean" and "gap_recovered" in s[arm] else ""
            comp.append(f"| `{arm}` | `{ref}` | {_iv(c['pair_confusions'])} | {rel} | {_iv(c['accuracy_points'], 2)} | "
                        f"{_iv(paired_interval(doff))} | {gap} |")
        checks[arm] = _goal(arm, s)
    return table + "\n\n" + "\n".join(comp), checks


def _goal(arm: str, s: dict) -> dict | None:
    """The real case's goal for one explanation arm: -15% pair confusions against its same-budget
    reference, accuracy >= -0.1 points, and beating random and the better baseline, every
    interval excluding zero."""
    stages = arm_stages(arm)
    if not set(stages) & EXPLANATION:
        return None
    two = len(stages) >= 2
    comps = s[arm]["comparisons"]
    ref = "full->full" if two else "full"
    rnd = "random->full" if two else "random"
    base = (s.get("full->full", {}) if two else {}).get("baseline_choice") if two else \
        min((n for n in ("pairup", "hard") if n in s), key=lambda n: s[n]["pair_confusions_mean"], default=None)
    need = [r for r in (ref, rnd, base) if r]
    if any(r not in comps for r in need):
        return None
    c_ref = comps[ref]
    ok = {
        "cut >= 15%": c_ref["relative_pair_confusions"] is not None and c_ref["relative_pair_confusions"] <= -0.15
        and c_ref["pair_confusions"]["excludes_zero"],
        "accuracy >= -0.1 points": c_ref["accuracy_points"]["mean"] >= -0.1,
        "beats random": comps[rnd]["pair_confusions"]["mean"] < 0 and comps[rnd]["pair_confusions"]["excludes_zero"],
        "beats the better of pairup / hard": base is not None and comps[base]["pair_confusions"]["mean"] < 0
        and comps[base]["pair_confusions"]["excludes_zero"],
    }
    if "clean" in s and two:  # the planted shortcut's goal: 75% of the gap to the clean model
        gap = s[arm].get("gap_recovered")
        ok["gap to clean >= 75%"] = gap is not None and gap["mean"] >= 0.75
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the --out folder of loop_experiment.py")
    p.add_argument("prefix", type=Path)
    p.add_argument("--notes", type=Path, help="markdown appended after the tables")
    p.add_argument("--title", default=None)
    args = p.parse_args()
    results = load_results(args.out / "run")
    extra_path = args.out / "extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    body, checks = tables(results, extra)
    a, b = results["pair"]
    na, nb = results["pair_names"]
    cfg = results["config"]
    st = results["start"]
    cell_seconds = [c["seconds"] for arm in results["arms"].values() for c in arm["seeds"].values()]
    head = [f"# {args.title or f'{na} vs {nb}'}", "",
            f"Pair ({a}, {b}) = {na} / {nb}. Every arm starts from the tracked run's final weights (accuracy "
            f"{100 * st['accuracy']:.2f}%, pair confusions {st['pair_confusions']} = {st['a_as_b']} {na} as {nb} + "
            f"{st['b_as_a']} {nb} as {na}); {cfg['epochs_per_stage']} epoch per stage, SGD lr {cfg['lr']:g}, batch "
            f"{cfg['batch_size']}, precision {cfg['precision']}, seeds {cfg['seeds']} (paired: common data order "
            f"within a seed); test set of {cfg['test_size']} images. Intervals: 95% t-intervals of the paired "
            f"per-seed differences; **\\*** = the interval excludes 0.", "",
            f"Compute: {len(cell_seconds)} cells, {sum(cell_seconds) / 60:.0f} min of fine-tuning and evaluation "
            f"in all (2 CPU cores shared with another experiment; see the notes).", ""]
    t = results.get("targets")
    if t:
        per = "; ".join(f"{v['name']}: {v['targets']} of {v['samples']} ({100 * v['share']:.1f}%), "
                        f"{v['errors_targeted']} of the class's {v['errors']} training errors"
                        for v in t["per_class"].values())
        used = [p for p in t["prototypes"] if p.get("used")]
        protos = ", ".join(f"{p['prototype']} ({p['kind']}, separability {p.get('separability', 0):.2f})" for p in used)
        head += [f"Targets ({t['rule']['select']} rule{', fallback: no flagged prototype separated cleanly' if t['rule'].get('fallback') else ''}): "
                 f"{t['targets']} samples ({per}). Prototypes used: {protos}; flagged but not used: "
                 f"{', '.join(str(p['prototype']) + ' (' + p['kind'] + (', %.2f' % p['separability'] if p.get('separability') is not None else '') + ')' for p in t['prototypes'] if not p.get('used'))}.", ""]
    sc = extra.get("shortcut")
    if sc:
        head += [f"Against where the mark was drawn: {sc['marked_pair_samples']} marked samples in the pair, "
                 f"{sc['targets']} targets, precision {sc['precision']:.3f}, recall {sc['recall']:.3f}; the mark's "
                 f"prototype ({sc['mark_prototype']}) flagged: {sc['mark_prototype_flagged']}.", ""]
    keys = max((list(v) for v in checks.values() if v), key=len, default=[])
    goal = ["", "## The goals, arm by arm (explanation arms; the mean gap share for the shortcut)", "",
            "| arm | " + " | ".join(keys) + " |"]
    if keys:
        goal.append("|---|" + "---|" * len(keys))
        for arm, v in checks.items():
            if v:
                goal.append(f"| `{arm}` | " + " | ".join("-" if k not in v else "yes" if v[k] else "no" for k in keys) + " |")
    ceiling = extra.get("ceiling")
    if ceiling:
        goal += ["", "## Ceiling: how much of the pair's confusion is reducible at all (one seed each)", "",
                 "| model | epochs | accuracy % | pair confusions |", "|---|---|---|---|"]
        for name, c in ceiling.items():
            goal.append(f"| {name} | {c['epochs']} | {100 * c['accuracy']:.2f} | {c['pair_confusions']} |")
    notes = args.notes.read_text() if args.notes else ""
    md = "\n".join(head) + "\n## Arms\n\n" + body + "\n" + "\n".join(goal) + "\n\n" + notes
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    args.prefix.with_suffix(".md").write_text(md)
    data = {"pair": results["pair"], "pair_names": results["pair_names"], "config": results["config"],
            "start": results["start"], "targets": results["targets"], "arms": results["arms"],
            "summary": results["summary"], "goal": checks, "extra": extra}
    args.prefix.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(md)


if __name__ == "__main__":
    main()
