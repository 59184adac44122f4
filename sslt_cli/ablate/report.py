"""The ablation's results as text and pictures: the rich table, ``summary.csv``, ``summary.md``, ``cells.csv`` and the
chart, each built from the cells' results and returned (a Table, text or PNG bytes). Pure: no file, no MLflow; the
runner writes what this module returns.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rich.markup import escape
from rich.table import Table

from sslt_cli.ablate.spec import PAPER_METRICS, TICKS, Ablation, Cell, Row, grid_names, value_text
from sslt_cli.runs import Run


@dataclass
class CellResult:
    """A cell's state on disk. ``status``: finished | failed | interrupted | pending; ``action``: what running the
    ablation does next (skip | train | resume | retrieve); ``metrics``: its test record (and retrieval), if any."""

    cell: Cell
    status: str
    run: Run | None
    metrics: dict[str, float]
    error: str | None
    action: str
    note: str = ""


@dataclass
class RowSummary:
    """A row over its seeds: tick values from its recipe and each metric's values from the cells that have them."""

    row: Row
    cells: list[CellResult]
    ticks: dict[str, bool]
    values: dict[str, list[float]]

    def mean(self, key: str) -> float | None:
        """Mean over the seeds that have a result; None when none has."""
        vals = self.values.get(key) or []
        return sum(vals) / len(vals) if vals else None

    def std(self, key: str) -> float | None:
        """Sample standard deviation over seeds (n - 1 in the denominator); None below two seeds."""
        vals = self.values.get(key) or []
        if len(vals) < 2:
            return None
        m = sum(vals) / len(vals)
        return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))

    def count(self, status: str) -> int:
        """Cells of the row in ``status``."""
        return sum(1 for c in self.cells if c.status == status)

    @property
    def n_done(self) -> int:
        """Cells of the row with a test result."""
        return sum(1 for c in self.cells if c.metrics)

    def paper(self, key: str) -> float | None:
        """The paper's value of ``key`` for the row, if the file gives one."""
        return getattr(self.row.paper, key) if self.row.paper is not None else None



# ------------------------------------------------------------------------------------------------ results

def summarise(ablation: Ablation, results: list[CellResult]) -> list[RowSummary]:
    """One summary per row, in the file's order, over the row's cells (seeds in the order run)."""
    out = []
    for row in ablation.rows:
        cells = [r for r in results if r.cell.row == row.name]
        values: dict[str, list[float]] = {}
        for _, key in ablation.metrics:
            values[key] = [r.metrics[key] for r in cells if key in r.metrics]
        ticks = {name: fn(cells[0].cell.recipe) for name, fn in TICKS.items()} if cells else {}
        out.append(RowSummary(row=row, cells=cells, ticks=ticks, values=values))
    return out


def x100(value: float | None, signed: bool = False) -> str:
    """A fraction as the table shows it: ``0.3292`` -> ``32.92`` (``+32.92`` when ``signed``); empty for None."""
    if value is None:
        return ""
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _seeds_text(s: RowSummary) -> str:
    text = f"{s.n_done}/{len(s.cells)}"
    failed = s.count("failed")
    return text + (f" ({failed} failed)" if failed else "")


def _table_columns(ablation: Ablation, summaries: list[RowSummary]) -> list[tuple[str, str, Callable]]:
    """(header, justify, value(summary, previous summary) -> text) for the table and summary.md."""
    columns: list[tuple[str, str, Callable]] = [("row", "left", lambda s, p: s.row.label)]
    if ablation.mode == "rows":
        columns += [(name, "center", lambda s, p, name=name: "✓" if s.ticks.get(name) else "") for name in TICKS]
    else:
        short = grid_names(list(ablation.grid_keys))
        columns += [(short[k], "right", lambda s, p, k=k: value_text(s.row.values[k])) for k in ablation.grid_keys]
    columns.append(("seeds", "right", lambda s, p: _seeds_text(s)))
    with_paper = any(s.row.paper is not None for s in summaries)
    compared = {key for _, key in PAPER_METRICS}
    for header, key in ablation.metrics:
        def mean_std(s: RowSummary, p: RowSummary | None, key: str = key) -> str:
            mean, std = s.mean(key), s.std(key)
            return x100(mean) + (f" ± {x100(std)}" if std is not None else "")

        def paper(s: RowSummary, p: RowSummary | None, key: str = key) -> str:
            delta = _diff(s.paper(key), p.paper(key)) if p else None
            return x100(s.paper(key)) + (f" ({x100(delta, signed=True)})" if delta is not None else "")

        columns.append((header, "right", mean_std))
        # the deltas and the paper's values only for cIoU and AUC, the paper's columns: the table stays readable
        if key in compared:
            columns.append(("Δ", "right", lambda s, p, key=key: x100(_diff(s.mean(key), p.mean(key)) if p else None,
                                                                         signed=True)))
            if with_paper:
                columns.append(("paper (Δ)", "right", paper))
    return columns


def _table_cells(ablation: Ablation, summaries: list[RowSummary]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    columns = _table_columns(ablation, summaries)
    rows = [[fn(s, summaries[i - 1] if i else None) for _, _, fn in columns] for i, s in enumerate(summaries)]
    return [(header, justify) for header, justify, _ in columns], rows


def _title(ablation: Ablation, seeds: int) -> str:
    return (f"ablation {ablation.name}: base {ablation.base.name}, test set {ablation.evaluate_set} "
            f"({ablation.checkpoint} checkpoint), {seeds} seed{'s' if seeds != 1 else ''}")


def summary_table(ablation: Ablation, summaries: list[RowSummary]) -> Table:
    """The rich table: row, switches (or grid values), seeds done, each metric x100 as mean ± std over seeds with
    the delta to the row above, and the paper's value and delta beside cIoU and AUC."""
    headers, rows = _table_cells(ablation, summaries)
    seeds = max((len(s.cells) for s in summaries), default=0)
    table = Table(title=_title(ablation, seeds), caption="x100; mean ± sample std over seeds; Δ: to the row above")
    switches = set(TICKS) if ablation.mode == "rows" else set()
    for k, (header, justify) in enumerate(headers):
        if header in switches:
            # a narrow terminal folds the switch headers (their cells are one tick wide), never a number
            table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
        else:
            widest = max([len(header), *(len(values[k]) for values in rows)])
            table.add_column(header, justify=justify, no_wrap=True, min_width=widest)  # type: ignore[arg-type]
    for values in rows:
        table.add_row(*(escape(v) for v in values))
    return table


def paper_orderings(summaries: list[RowSummary], key: str) -> list[tuple[str, str, float, float | None]]:
    """For consecutive rows that both have the paper's value of ``key`` (and differ in it): (row above, row, the
    paper's change, our change of the mean (None where a row has no result yet))."""
    out = []
    for prev, cur in zip(summaries, summaries[1:]):
        paper = _diff(cur.paper(key), prev.paper(key))
        if paper is None or paper == 0:
            continue
        out.append((prev.row.label, cur.row.label, paper, _diff(cur.mean(key), prev.mean(key))))
    return out


def ordering_lines(summaries: list[RowSummary]) -> list[str]:
    """One line per metric: which of the paper's steps between consecutive rows the results reproduce (a step is
    reproduced when our mean moves in the paper's direction; '=' marks a tie, '?' a row without a result)."""
    lines = []
    for header, key in PAPER_METRICS:
        steps = paper_orderings(summaries, key)
        measured = [s for s in steps if s[3] is not None]
        if not measured:
            continue
        same = sum(1 for _, _, paper, ours in measured if ours and (ours > 0) == (paper > 0))
        parts = []
        for above, row, paper, ours in steps:
            mark = "?" if ours is None else "=" if ours == 0 else "✓" if (ours > 0) == (paper > 0) else "✗"
            parts.append(f"{above}{'<' if paper > 0 else '>'}{row} {mark}")
        lines.append(f"{header}: {same} of {len(measured)} of the paper's steps reproduced ({', '.join(parts)})")
    return lines


def baseline_line(ablation: Ablation, results: list[CellResult]) -> str | None:
    """``N = 500 test clips (vggss); centre-prior baseline: cIoU 34.10, AUC 37.20`` from the evaluated cells."""
    done = [r.metrics for r in results if r.metrics]
    if not done:
        return None
    sizes = sorted({int(m["n"]) for m in done if "n" in m})
    text = f"N = {' or '.join(map(str, sizes))} test clips ({ablation.evaluate_set})"
    centre = next((m for m in done if "baseline_centre/ciou" in m), None)
    if centre is not None:
        text += (f"; centre-prior baseline: cIoU {x100(centre['baseline_centre/ciou'])}, "
                 f"AUC {x100(centre.get('baseline_centre/auc'))}")
    return text


def failed_lines(results: list[CellResult]) -> list[str]:
    """``<cell>: <error>`` for each failed cell."""
    return [f"{r.cell.name}: {r.error or 'failed'}" for r in results if r.status == "failed"]


def markdown(ablation: Ablation, summaries: list[RowSummary], results: list[CellResult]) -> str:
    """``summary.md``: the title, where the ablation comes from, the table, the baseline, orderings, failed cells."""
    headers, rows = _table_cells(ablation, summaries)
    seeds = max((len(s.cells) for s in summaries), default=0)

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    text = [f"# {_title(ablation, seeds)}", "",
            f"Ablation file `{ablation.path}`, base recipe `{ablation.base_path}`"
            + (f", overrides `{' '.join(ablation.file_overrides + ablation.command_overrides)}`"
               if ablation.file_overrides or ablation.command_overrides else "") + ".",
            "Values x100; mean ± sample std over seeds; Δ: to the row above.", "",
            line([h for h, _ in headers]),
            "|" + "|".join(":---" if j == "left" else ":---:" if j == "center" else "---:" for _, j in headers) + "|"]
    text += [line(r) for r in rows]
    baseline = baseline_line(ablation, results)
    if baseline:
        text += ["", baseline + "."]
    orderings = ordering_lines(summaries)
    if orderings:
        text += ["", "## The paper's orderings", ""] + [f"- {o}" for o in orderings]
    failed = failed_lines(results)
    if failed:
        text += ["", "## Failed cells", ""] + [f"- `{f.splitlines()[0]}`" for f in failed]
    return "\n".join(text) + "\n"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def summary_csv(ablation: Ablation, summaries: list[RowSummary]) -> str:
    """``summary.csv``: a row per ablation row with its switches (or grid values), seeds, each metric's mean, std and
    delta to the row above (fractions, not x100), and the paper's values and deltas."""
    keys = [key for _, key in ablation.metrics]
    labels = list(TICKS) if ablation.mode == "rows" else list(ablation.grid_keys)
    header = ["row", *labels, "seeds", "seeds_done", "seeds_failed"]
    for key in keys:
        column = key.replace("/", "_")
        header += [f"{column}_mean", f"{column}_std", f"{column}_delta"]
    header += [f"paper_{k}" for _, k in PAPER_METRICS] + [f"paper_{k}_delta" for _, k in PAPER_METRICS]
    rows = []
    for i, s in enumerate(summaries):
        prev = summaries[i - 1] if i else None
        marks = ([int(s.ticks.get(n, False)) for n in labels] if ablation.mode == "rows"
                 else [value_text(s.row.values[k]) for k in labels])
        row: list[Any] = [s.row.name, *marks, len(s.cells), s.n_done, s.count("failed")]
        for key in keys:
            row += [_number(s.mean(key)), _number(s.std(key)),
                    _number(_diff(s.mean(key), prev.mean(key)) if prev else None)]
        row += [_number(s.paper(k)) for _, k in PAPER_METRICS]
        row += [_number(_diff(s.paper(k), prev.paper(k)) if prev else None) for _, k in PAPER_METRICS]
        rows.append(row)
    return _csv_text(header, rows)


def cells_csv(ablation: Ablation, results: list[CellResult]) -> str:
    """``cells.csv``: a line per cell with its status, run folder, metrics and first error line."""
    keys = [key for _, key in ablation.metrics]
    keys += ["n", "baseline_centre/ciou", "baseline_centre/auc"]
    header = ["cell", "row", "seed", "status", "run_dir", *(k.replace("/", "_") for k in keys), "error"]
    rows = []
    for r in results:
        error = r.error.splitlines()[0] if r.error else ""
        rows.append([r.cell.name, r.cell.row, r.cell.seed, r.status, str(r.run.dir) if r.run else "",
                     *[_number(r.metrics.get(k)) for k in keys], error])
    return _csv_text(header, rows)


def chart_png(ablation: Ablation, summaries: list[RowSummary], results: list[CellResult]) -> bytes:
    """cIoU and AUC per row: bars at the mean over seeds with sample-std error bars, each seed as a dot, the
    paper's values as diamonds and the centre-prior baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.row.label for s in summaries]
    width = max(6.0, 0.9 * len(labels) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(width, 4.2), squeeze=False)
    x = list(range(len(summaries)))
    for ax, (header, key) in zip(axes[0], PAPER_METRICS):
        means = [100 * m if (m := s.mean(key)) is not None else 0.0 for s in summaries]
        errors = [100 * e if (e := s.std(key)) is not None else 0.0 for s in summaries]
        ax.bar(x, means, yerr=errors, capsize=4, color="#4c72b0", alpha=0.85, label="sslt (mean ± std)")
        dots = [(i, 100 * v) for i, s in enumerate(summaries) for v in s.values.get(key, [])]
        if dots:
            ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=12, color="black", zorder=3, label="seeds")
        paper = [(i, 100 * p) for i, s in enumerate(summaries) if (p := s.paper(key)) is not None]
        if paper:
            ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="D", s=40, color="#c44e52", zorder=4,
                       label="paper")
        centres = [(i, 100 * values[0]) for i, s in enumerate(summaries)
                   if (values := [c.metrics[f"baseline_centre/{key}"] for c in s.cells
                                  if f"baseline_centre/{key}" in c.metrics])]
        if centres and max(c for _, c in centres) - min(c for _, c in centres) > 1e-6:
            # rows on different data (generated per row): each row's own centre prior
            ax.scatter([c[0] for c in centres], [c[1] for c in centres], marker="_", s=400, color="grey", zorder=4,
                       label="centre prior")
        elif centres:
            ax.axhline(centres[0][1], color="grey", linestyle="--", linewidth=1, label="centre prior")
        ax.set_xticks(x, labels, rotation=0 if ablation.mode == "rows" and max(map(len, labels)) <= 6 else 30,
                      ha="center" if ablation.mode == "rows" and max(map(len, labels)) <= 6 else "right", fontsize=8)
        ax.set_ylabel(f"{header} (x100)")
        ax.set_title(header)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{ablation.name} (base {ablation.base.name}, {ablation.evaluate_set}, {ablation.checkpoint})",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()



def describe(result: CellResult) -> str:
    """What running the ablation does next with the cell, in words (``resume <run folder>``)."""
    run = result.run.dir.name if result.run is not None else ""
    return {"train": "train" + (" anew" if result.run is not None else ""), "resume": f"resume {run}",
            "retrieve": f"retrieve with {run}", "skip": f"finished ({run})"}[result.action]



def plan_table(ablation: Ablation, results: list[CellResult]) -> Table:
    """``--dry-run``: each cell, its state and what running the ablation would do with it."""
    table = Table(title=f"ablation {ablation.name}: {len(results)} cells in {ablation.folder}")
    table.add_column("cell", no_wrap=True)
    table.add_column("status")
    table.add_column("next", overflow="fold")
    table.add_column("row overrides", overflow="fold")
    if ablation.synthetic is not None:
        table.add_column("generated data", overflow="fold")
    rows = {r.name: r for r in ablation.rows}
    for r in results:
        values = [r.cell.name, r.status, describe(r) + (f" ({r.note})" if r.note else ""),
                  " ".join(rows[r.cell.row].overrides)]
        if ablation.synthetic is not None and r.cell.data is not None:
            values.append(f"{r.cell.data.knobs_text} -> {r.cell.data.root}")
        table.add_row(*(escape(v) for v in values))
    return table


def report_lines(ablation: Ablation, results: list[CellResult]) -> list[str]:
    """The lines printed under the table: the test-set size and centre-prior baseline, the paper's orderings, and
    each failed cell."""
    summaries = summarise(ablation, results)
    lines = [text for text in [baseline_line(ablation, results), *ordering_lines(summaries)] if text]
    return lines + [f"failed: {text}" for text in failed_lines(results)]
