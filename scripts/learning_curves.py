"""Learning curves of a run folder, drawn from its metrics.jsonl: the training loss against chance (ln of the
candidates, the learning check's figure) and the validation AUC against the centre prior, with the learning check
and the final test marked.

    python scripts/learning_curves.py runs/quickstart-20261208-010000 --out curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_records(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def draw(run_dir: Path, out: Path, title: str | None = None) -> Path:
    """Two panels (loss; validation AUC) as a PNG at ``out``."""
    records = read_records(run_dir)
    train = [r for r in records if r.get("kind") == "train" and "l_cl1" in r]
    val = [r for r in records if r.get("kind") == "val" and "auc" in r]
    check = next((r for r in records if r.get("kind") == "learning_check"), None)
    tests = [r for r in records if r.get("kind") == "test" and r.get("checkpoint") == "best" and "auc" in r]
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").is_file() else {}
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_ax.plot([r["step"] for r in train], [r["l_cl1"] for r in train], color="#4c72b0", label="L_cl (train)")
    if check is not None:
        loss_ax.axhline(check["chance"], color="grey", linestyle="--", linewidth=1, label="chance (ln candidates)")
        loss_ax.axvline(check["step"], color="#c44e52", linestyle=":", linewidth=1, label="learning check")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=7)
    loss_ax.grid(alpha=0.3)
    auc_ax.plot([r["step"] for r in val], [100 * r["auc"] for r in val], marker="o", color="#4c72b0",
                label="validation AUC")
    centre = check.get("centre_auc") if check else None
    if centre is not None:
        auc_ax.axhline(100 * centre, color="grey", linestyle="--", linewidth=1, label="centre prior (validation)")
    for r in tests:
        auc_ax.scatter([r["step"]], [100 * r["auc"]], marker="D", color="#c44e52", zorder=3,
                       label=f"test {r.get('set', '')} (best)")
        if "baseline_centre/auc" in r:
            auc_ax.scatter([r["step"]], [100 * r["baseline_centre/auc"]], marker="_", s=300, color="grey", zorder=3,
                           label="centre prior (test)")
    auc_ax.set_xlabel("step")
    auc_ax.set_ylabel("AUC (x100)")
    auc_ax.legend(fontsize=7)
    auc_ax.grid(alpha=0.3)
    fig.suptitle(title or f"{run_dir.name} ({meta.get('recipe_name', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/learning_curves.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    print(draw(args.run_dir, args.out or args.run_dir / "learning_curves.png", args.title))


if __name__ == "__main__":
    main()
