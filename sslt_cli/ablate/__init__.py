"""Ablations: a study of many training runs in one command, with a table, a chart and one MLflow parent run.

An ablation file (YAML, validated like a recipe, unknown keys refused) names a base recipe and either named ``rows``
or a ``grid`` (the cartesian product of values of recipe keys), plus seeds::

    base: ../tie_full.yaml             # relative to this file or the cwd; a bare name finds recipes/<name>.yaml
    overrides: [optim.epochs=20]       # applied to every cell
    rows:                              # named rows, in this order
      A: {switches: {T_app: false, T_geo: false, T_mask: false, T_mix: false, L_geo: false},
          paper: {ciou: 0.3292, auc: 0.3744}}
      B: {switches: {T_app: true}, overrides: [transforms.app.gray_p=0]}
    seeds: 1                           # a count (the base recipe's seed, +1, ...) or a list such as [4, 5]
    evaluate: {set: vggss, checkpoint: best}
    retrieve: false                    # also run `sslt retrieve` on each cell's run

A cell is one (row, seed). Its recipe is, in order of precedence: the base recipe < the file's ``overrides`` < the
row's switches < the row's overrides (or the grid values) < the command line's recipe overrides; the cell's ``name``
(``<row>-seed<k>``), ``seed`` and ``runs_dir`` come last. On the command line ``base=``, ``name=``, ``seeds=``,
``evaluate.set=``, ``evaluate.checkpoint=`` and ``retrieve=`` change the ablation; every other ``key=value`` is a
recipe override for every cell. Every cell's recipe is validated before anything runs.

Folder (``<runs_dir>/ablations/<name>/``; ``name`` defaults to the file's stem)::

    ablation.json          state: the base recipe, command-line overrides and seeds run; each cell's run folders,
                           status and error; the parent MLflow run
    <row>-seed<k>-<time>/  one ordinary run folder per cell (the cell's recipe name is the cell's name)
    .spec_cache/           the log-mel cache train.py keeps beside run folders, shared by all cells
    summary.csv  summary.md  summary.png  cells.csv

All cells share one ``runs_dir`` so they share the log-mel cache (keyed by the front-end settings, so sharing is
safe): one folder per cell would compute and store it once per cell, which for VGGSound-144k at 257 mels is about
100 GB each. ``ablation.json`` records each cell's run folders as they are created; the newest made with exactly the
cell's recipe is the cell's run, and one made with another recipe (the file or the base recipe's text changed) is left
untouched while the cell trains anew. (A folder whose state predates that record finds a cell's runs by their recipe
name, which is the cell's name.)

A folder holds one ablation: a command whose base recipe or command-line recipe overrides differ from those recorded
in ``ablation.json`` is refused and told to give ``name=`` (a folder of its own). Refusing keeps every existing folder
where it is and names the difference; a folder name derived from the base and the overrides would be unreadable. Its
seeds are the recorded ones: a re-run or ``--report`` without ``--seeds`` or ``seeds=`` uses them; with them, the
recorded seeds change, and the command says so.

A re-run skips finished cells, resumes an interrupted one from its last checkpoint, and re-tries a failed one in a new
run folder (a cell whose training finished but whose retrieval failed only retrieves again). A failing cell is recorded
with its error and the other cells go on. MLflow: one parent run for the ablation; the ablation creates each cell's
run folder and opens its MLflow run, the parent's child (``mlflow.parentRunId``) with the cell's tags from its
creation, and hands its sink to ``train`` (and ``retrieve``). Other seeds get a new parent run (MLflow keeps a run's
parameters, ``ablation.seeds`` among them, as first logged) and the finished cells' runs, made under the old parent,
become its children (tagged from the new parent's side).

The package: :mod:`~sslt_cli.ablate.spec` (the file's language: parse, validate, expand cells),
:mod:`~sslt_cli.ablate.runner` (state, lock, resume, running the cells, the MLflow parent run) and
:mod:`~sslt_cli.ablate.report` (the table, CSV, Markdown and chart, built from the results, no I/O).
"""

from sslt_cli.ablate.report import (CellResult, RowSummary, baseline_line, ordering_lines, paper_orderings,
                                    plan_table, summarise, summary_table)
from sslt_cli.ablate.runner import (LOCK, STATE, STATE_FORMAT, AblationResult, inspect_cell, load_state,
                                    read_cell_metrics, run_ablation, write_report)
from sslt_cli.ablate.spec import (ABLATION_KEYS, SWITCHES, TICKS, Ablation, AblationSpec, Cell, Row, cell_name,
                                  expand_cells, load_ablation, resolve_base, resolve_seeds)
from sslt_cli.errors import RecipeError, SsltError

__all__ = ["ABLATION_KEYS", "LOCK", "STATE", "STATE_FORMAT", "SWITCHES", "TICKS", "Ablation", "AblationResult",
           "AblationSpec", "Cell", "CellResult", "RecipeError", "Row", "RowSummary", "SsltError", "baseline_line",
           "cell_name", "expand_cells", "inspect_cell", "load_ablation", "load_state", "ordering_lines", "paper_orderings",
           "plan_table", "read_cell_metrics", "resolve_base", "resolve_seeds", "run_ablation", "summarise",
           "summary_table", "write_report"]
