"""The M-BEIR evaluation report: ``report.json`` (the numbers), ``report.md`` (a table beside the published
numbers), ``report.png`` (a bar chart); and a before/after comparison table.

Every file is replaced atomically, ``report.json`` last, so a report that has a ``report.json`` is whole.

A report names its search per index (``search``: exact, or ScaNN with its parameters and its measured
agreement with exact search, or a note that it was not measured), lists the test records the embedding
skipped (``skipped``), and is ``complete`` only with all 16 tasks and nothing skipped.

With wrong-modality shares in its results (the global pool, :func:`mmret.eval.metrics.wrong_modality_share`)
each task holds ``wrong_modality@<headline k>`` (percent of the top k whose modality is not the task's
target; lower is better) and the report ``wrong_modality_average``; report.md shows a column for it.
Reports without them (local pools, or written before the field existed) read the same, "n/a" where a
table asks for it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

from mmret.atomic_dir import PathLike, as_path
from mmret.data.mbeir import EVAL_TASKS, dataset_task
from mmret.eval import published
from mmret.eval.metrics import KS, TaskResult, average, write_atomic, wrong_modality_average
from mmret.recipe import POOLS

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
#: The published systems shown beside ours.
BASELINES: tuple[published.PublishedSystem, ...] = (published.UNIIR_CLIP_SF, published.U_MARVEL)

_EVAL_NAMES = tuple(t.name for t in EVAL_TASKS)
_DASH = "\u2013"
_NA = "n/a"
#: The report.md / comparison column of the wrong-modality share.
WRONG_MODALITY_HEAD = "wrong modality % (top k, lower is better)"


def _ordered(names: Iterable[str]) -> list[str]:
    """Task names in paper order, any others after them in name order."""
    names = set(names)
    return [n for n in _EVAL_NAMES if n in names] + sorted(names - set(_EVAL_NAMES))


def _fmt(value: float | None) -> str:
    return _DASH if value is None else f"{value:.1f}"


def _fmt_na(value: float | None) -> str:
    """A value a report may lack (one written before the field existed): "n/a" then."""
    return _NA if value is None else f"{value:.1f}"


def _published_task(system: published.PublishedSystem, task: str, pool: str) -> float | None:
    """A system's published number for ``task`` on ``pool`` (per-task numbers exist for the local pool only)."""
    return system.local.get(task) if pool == "local" and system.local is not None else None


def _published_average(system: published.PublishedSystem, tasks: list[str], pool: str) -> float | None:
    """The published average, or locally over a subset of the 16 tasks the mean over that subset."""
    if pool == "global" or set(tasks) == set(_EVAL_NAMES):
        return system.average(pool)
    values = [_published_task(system, t, pool) for t in tasks]
    return None if any(v is None for v in values) else sum(values) / len(values)


def wrong_modality_key(k: int) -> str:
    """The per-task report.json key of the wrong-modality share at ``k``: ``wrong_modality@<k>``."""
    return f"wrong_modality@{k}"


def task_wrong_modality(task: Mapping[str, Any]) -> float | None:
    """A report task's wrong-modality share at its headline k (percent), or None when it has none."""
    value = task.get(wrong_modality_key(task["headline_k"]))
    return None if value is None else float(value)


def has_wrong_modality(report: Mapping[str, Any]) -> bool:
    """Whether any task of ``report`` has a wrong-modality share."""
    return any(task_wrong_modality(t) is not None for t in report["tasks"].values())


def skipped_queries(report: Mapping[str, Any]) -> dict[str, int]:
    """Test queries the embedding skipped, per task (``{}`` when none)."""
    return {t: int(v["count"]) for t, v in report.get("skipped", {}).get("queries", {}).items()}


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def search_summary(report: Mapping[str, Any]) -> str:
    """The search methods used, e.g. ``exact`` or ``exact (14 of 16 indexes), ScaNN (2 of 16 indexes)``."""
    methods = [v["method"] for v in report["search"].values()]
    names = {"exact": "exact", "scann": "ScaNN"}
    parts = [f"{names.get(m, m)} ({methods.count(m)} of {len(methods)} indexes)" for m in sorted(set(methods))]
    return names.get(methods[0], methods[0]) if len(set(methods)) == 1 else ", ".join(parts)


def _search_lines(report: Mapping[str, Any]) -> list[str]:
    """The report.md section on the search: method per index; for ScaNN its agreement with exact search."""
    lines = ["", "## Search", ""]
    searches = report["search"]
    exact = [name for name, v in searches.items() if v["method"] == "exact"]
    if exact:
        which = "every index" if len(exact) == len(searches) else ", ".join(exact)
        lines.append(f"- exact search (inner product, all candidates): {which}")
    rows = []
    for name, v in searches.items():
        if v["method"] == "exact":
            continue
        lines.append(f"- {name}: ScaNN ({_params(v.get('params', {}))})")
        if v.get("agreement") is None:
            lines.append(
                "  - agreement with exact search: not measured (eval.check_exact = 0); "
                "the numbers may be below exact search's"
            )
            continue
        for task, a in v["agreement"].items():
            rows.append(
                f"| {name} | {task} | {a['queries']} | R@{a['k']} | {a['recall_scann']:.1f} | "
                f"{a['recall_exact']:.1f} | {a['difference'] + 0.0:+.1f} | {a['neighbour_recall@10']:.4f} |"
            )
    if rows:
        lines += [
            "",
            "ScaNN against exact search on sampled queries (the reported metric: headline Recall@k, percent):",
            "",
            "| index | task | queries | k | ScaNN | exact | Δ (ScaNN − exact) | neighbour recall@10 |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    return lines


def _skipped_lines(report: Mapping[str, Any]) -> list[str]:
    skipped = report.get("skipped", {})
    if not skipped:
        return []
    lines = ["", "## Skipped records (eval.on_bad_record = skip): this report is not complete", ""]
    for task, v in skipped.get("queries", {}).items():
        reasons = ", ".join(f"{r} {n}" for r, n in v.get("reasons", {}).items())
        lines.append(f"- {task}: {v['count']} test queries dropped ({reasons})")
        lines += [f"  - e.g. {e}" for e in v.get("examples", [])]
    if "other_records" in skipped:
        v = skipped["other_records"]
        reasons = ", ".join(f"{r} {n}" for r, n in v.get("reasons", {}).items())
        lines.append(f"- other records (pools, instructions): {v['count']} dropped ({reasons})")
        lines += [f"  - e.g. {e}" for e in v.get("examples", [])]
    return lines


def _incomplete_note(report: Mapping[str, Any]) -> str:
    notes = []
    n = sum(t in _EVAL_NAMES for t in report["tasks"])
    if n != len(_EVAL_NAMES):
        notes.append("the average is over these tasks only")
    if skipped := skipped_queries(report):
        notes.append(f"{sum(skipped.values())} test queries skipped")
    if "other_records" in report.get("skipped", {}):
        notes.append(f"{report['skipped']['other_records']['count']} pool/instruction records skipped")
    return "" if report["complete"] else f" (not complete: {'; '.join(notes)})"


def _markdown(report: dict[str, Any]) -> str:
    pool, tasks = report["pool"], list(report["tasks"])
    n_eval = sum(t in _EVAL_NAMES for t in tasks)
    lines = [
        f"# M-BEIR evaluation ({pool} pool)",
        "",
        f"- M-BEIR root: `{report['mbeir_root']}`",
        f"- checkpoint: `{report['checkpoint']}`" if report["checkpoint"] else "- checkpoint: none",
        f"- search: {search_summary(report)} (see Search below)",
        "- units: Recall@k in percent; headline = R@5 (R@10 for Fashion200K and FashionIQ)",
        f"- tasks: {n_eval} of {len(_EVAL_NAMES)} evaluated dataset-tasks" + _incomplete_note(report),
    ]
    bias = has_wrong_modality(report)
    if bias:
        lines.append(
            "- wrong modality: percent of each query's top k (the headline k) whose candidate modality is "
            "not the task's target modality, averaged over the queries (modality bias); lower is better"
        )
    lines += [f"- {key}: {value}" for key, value in report.get("extra", {}).items()]
    head = ["task", "queries", "R@1", "R@5", "R@10", "headline"] + [s.name for s in BASELINES]
    head += [WRONG_MODALITY_HEAD] if bias else []
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, t in report["tasks"].items():
        row = [name, str(t["num_queries"])] + [_fmt(t[f"recall@{k}"]) for k in KS]
        row += [f"{_fmt(t['headline'])} (R@{t['headline_k']})"]
        row += [_fmt(_published_task(s, name, pool)) for s in BASELINES]
        row += [_fmt_na(task_wrong_modality(t))] if bias else []
        lines.append("| " + " | ".join(row) + " |")
    skipped = sum(skipped_queries(report).values())
    label = "average" if report["complete"] else f"average ({len(tasks)} tasks)"
    if skipped:
        label = f"average ({len(tasks)} tasks, {skipped} queries skipped)"
    total = sum(t["num_queries"] for t in report["tasks"].values())
    row = [f"**{label}**", str(total), "", "", "", f"**{_fmt(report['average'])}**"]
    row += [_fmt(_published_average(s, tasks, pool)) for s in BASELINES]
    row += [_fmt_na(report.get("wrong_modality_average"))] if bias else []
    lines.append("| " + " | ".join(row) + " |")
    notes = [f"{s.name} {_fmt(s.average(pool))}" for s in BASELINES]
    lines += ["", f"Published {pool}-pool averages over all 16 tasks (RECIPES.md s.2): " + ", ".join(notes) + "."]
    if pool == "global":
        lines.append("The papers give no per-task numbers for the global pool.")
    lines += _search_lines(report) + _skipped_lines(report)
    return "\n".join(lines) + "\n"


def _png(report: dict[str, Any]) -> bytes:
    """The bar chart as PNG bytes (matplotlib's Agg canvas; pyplot and the global backend are left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pool, tasks = report["pool"], list(report["tasks"])
    ours = [report["tasks"][t]["headline"] for t in tasks]
    fig = Figure(figsize=(max(6.0, 0.75 * len(tasks) + 2.5), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(tasks)))
    if pool == "local":
        width = 0.8 / (1 + len(BASELINES))
        series = [("ours", ours)] + [(s.name, [_published_task(s, t, pool) for t in tasks]) for s in BASELINES]
        for i, (label, values) in enumerate(series):
            offset = (i - len(BASELINES) / 2) * width
            pts = [(x + offset, v) for x, v in zip(xs, values, strict=True) if v is not None]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=label, color=f"C{i}")
    else:
        ax.bar(xs, ours, 0.6, label="ours", color="C0")
        for i, s in enumerate(BASELINES, 1):
            avg = s.average(pool)
            ax.axhline(avg, color=f"C{i}", linestyle="--", linewidth=1.5, label=f"{s.name} avg {_fmt(avg)}")
    ax.axhline(report["average"], color="black", linewidth=1.0, label=f"ours avg {_fmt(report['average'])}")
    ax.set_xticks(xs, [f"{t} (R@{report['tasks'][t]['headline_k']})" for t in tasks], rotation=45, ha="right")
    ax.set_ylabel("Recall@k (%)")
    ax.set_ylim(0, 100)
    note = "" if report["complete"] else f" ({len(tasks)} of 16 tasks"
    if skipped := sum(skipped_queries(report).values()):
        note += f", {skipped} queries skipped"
    ax.set_title(f"M-BEIR, {pool} pool, {search_summary(report)} search" + (note and note + ")"))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    out_dir: PathLike,
    *,
    results: Mapping[str, TaskResult],
    mbeir_root: str,
    pool: str,
    checkpoint: str | None,
    search: Mapping[str, Mapping[str, Any]],
    check_exact: int = 0,
    skipped: Mapping[str, Any] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Write ``report.png``, ``report.md`` and ``report.json`` under ``out_dir``; return what report.json holds.

    ``results`` maps dataset-task names to their results (in any order; written in paper order). ``search``:
    index name -> ``{"method": "exact"}`` or ``{"method": "scann", "params": {...}, "agreement": ...}``,
    agreement per task as :func:`mmret.eval.evaluate.agreement` gives it, or None when not measured
    (``check_exact``: the sample size per task, 0: not measured). ``skipped``: the embedding's skipped
    records (``{"queries": {task: {"count", "reasons", "examples"}}, "other_records": {...}}``; any makes
    the report not complete). ``fingerprint``: what the numbers depend on (``mmret.eval.run`` compares it
    before reusing the report). ``extra`` (JSON-serialisable) is stored under the key ``"extra"`` and
    listed in report.md; absent when ``None``.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if not results:
        raise ValueError("no task results to report")
    if not search:
        raise ValueError("no search named: give each index's method")
    search = {name: dict(v) for name, v in search.items()}
    for name, v in search.items():
        if v.get("method") not in ("exact", "scann"):
            raise ValueError(f"search[{name!r}]: method must be 'exact' or 'scann', got {v.get('method')!r}")
        if v["method"] == "scann":
            if check_exact and v.get("agreement") is None:
                raise ValueError(f"search[{name!r}]: check_exact {check_exact} but no agreement measured")
            v.setdefault("agreement", None)
            v["check_exact"] = check_exact
            if v["agreement"] is None:
                v["agreement_note"] = "not measured (eval.check_exact = 0)"
    for name, r in results.items():
        if dataset_task(name).name != r.task:
            raise ValueError(f"results[{name!r}] is the result of {r.task!r}")
        if missing := [k for k in KS if k not in r.recall]:
            raise ValueError(f"{name}: no Recall@{missing[0]}")
    tasks = {
        name: {
            **{f"recall@{k}": float(results[name].recall[k]) for k in KS},
            "num_queries": int(results[name].num_queries),
            "headline_k": results[name].headline_k,
            "headline": float(results[name].headline),
        }
        for name in _ordered(results)
    }
    bias = wrong_modality_average(results)  # raises when only some tasks have a share
    if bias is not None:
        for name, t in tasks.items():
            t[wrong_modality_key(t["headline_k"])] = float(results[name].wrong_modality)
    report: dict[str, Any] = {
        "mbeir_root": str(mbeir_root),
        "pool": pool,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "units": "percent",
        "tasks": tasks,
        "average": average(results),
        **({"wrong_modality_average": bias} if bias is not None else {}),
        "complete": set(tasks) == set(_EVAL_NAMES) and not skipped,
        "search": search,
        "skipped": dict(skipped or {}),
    }
    if fingerprint is not None:
        report["fingerprint"] = dict(fingerprint)
    if extra is not None:
        report["extra"] = dict(extra)
    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"  # fails before any write
    out = as_path(out_dir)
    write_atomic(out / REPORT_PNG, _png(report))
    write_atomic(out / REPORT_MD, _markdown(report).encode())
    write_atomic(out / REPORT_JSON, text.encode())
    return json.loads(text)


def read_report(out_dir: PathLike) -> dict:
    """The dict in ``out_dir/report.json``."""
    path = as_path(out_dir) / REPORT_JSON
    with path.open("r") as f:  # epath reads text as UTF-8
        report = json.load(f)
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise ValueError(f"{path}: not an M-BEIR report")
    return report


def _diff(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return _DASH
    return f"{round(after - before, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _side_wrong_modality(task: Mapping | None) -> float | str | None:
    """One side's wrong-modality share of a task: the number, "n/a" when the task has none (another pool,
    or a report written before the field existed), None when the task is missing."""
    if task is None:
        return None
    value = task_wrong_modality(task)
    return _NA if value is None else value


def _cell(value: float | str | None) -> str:
    return value if isinstance(value, str) else _fmt(value)


def _diff_cell(before: float | str | None, after: float | str | None) -> str:
    numbers = [v if isinstance(v, float | int) else None for v in (before, after)]
    return _diff(*numbers)


def compare_table(before: Mapping, after: Mapping, *, labels: tuple[str, str] = ("before", "after")) -> str:
    """A markdown table of two reports (dicts as in report.json): per task the headline before, after and
    their difference (after - before), then the averages; a task missing on one side shows "–". When
    either report has wrong-modality shares (the global pool), three more columns give them before and
    after and their difference (lower is better); a report without them shows "n/a"."""
    b_tasks, a_tasks = before["tasks"], after["tasks"]
    bias = has_wrong_modality(before) or has_wrong_modality(after)
    head = f"| task | k | {labels[0]} | {labels[1]} | \u0394 |"
    rule = "|---|---:|---:|---:|---:|"
    if bias:
        head += f" wrong modality % {labels[0]} | wrong modality % {labels[1]} | \u0394 (lower is better) |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for name in _ordered([*b_tasks, *a_tasks]):
        b, a = b_tasks.get(name), a_tasks.get(name)
        bv, av = (b or {}).get("headline"), (a or {}).get("headline")
        k = (b or a)["headline_k"]
        line = f"| {name} | {k} | {_fmt(bv)} | {_fmt(av)} | {_diff(bv, av)} |"
        if bias:
            bw, aw = _side_wrong_modality(b), _side_wrong_modality(a)
            line += f" {_cell(bw)} | {_cell(aw)} | {_diff_cell(bw, aw)} |"
        lines.append(line)
    bv, av = before.get("average"), after.get("average")
    line = f"| **average** | | {_fmt(bv)} | {_fmt(av)} | {_diff(bv, av)} |"
    if bias:
        bw, aw = (r.get("wrong_modality_average", _NA) for r in (before, after))
        line += f" {_cell(bw)} | {_cell(aw)} | {_diff_cell(bw, aw)} |"
    lines.append(line)
    notes = []
    if before.get("pool") != after.get("pool"):
        notes.append(f"pools differ ({before.get('pool')} vs {after.get('pool')})")
    if set(b_tasks) != set(a_tasks):
        notes.append("the task sets differ, so the averages are over different tasks")
    if notes:
        lines += ["", "Note: " + "; ".join(notes) + "."]
    if bias:
        lines += [
            "",
            "wrong modality: percent of each query's top k whose candidate modality is not the task's target "
            "modality (modality bias, global pool); lower is better.",
        ]
    return "\n".join(lines) + "\n"
