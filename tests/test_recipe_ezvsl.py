"""recipes/ezvsl.yaml: EZ-VSL's objective and evaluation preset, validated and trained for two steps on tiny data."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from rich.console import Console

from sslt_cli.config import load_recipe


def test_ezvsl_recipe_is_ezvsl_s_setting() -> None:
    recipe = load_recipe("ezvsl")
    assert (recipe.loss.objective, recipe.loss.temperature, recipe.eval.protocol) == ("ezvsl", 0.03, "ezvsl")
    assert (recipe.optim.batch_size, recipe.optim.epochs, recipe.optim.lr, recipe.optim.weight_decay) == (
        128, 20, 1e-4, 0.0)
    t = recipe.transforms
    assert (t.app.enabled, t.geo.enabled, t.mask.enabled, t.mix.enabled, t.equivariance.enabled) == (
        False, True, False, False, False)


def test_ezvsl_recipe_trains_two_steps_and_evaluates_under_its_preset(tmp_path: Path) -> None:
    from sslt_cli.data.synthetic import generate
    from callers import train_in
    from sslt_cli.runs import Run

    generate(tmp_path / "bench", n_train=16, n_val=4, n_test=4, n_flickr=2, image_size=64, workers=1,
             progress=False)
    recipe = load_recipe("ezvsl", [f"data.root={tmp_path / 'bench'}", "data.image_size=64", "data.num_workers=0",
                                   "data.test={vggss: test_vggss}", "audio.clip_seconds=3", "audio.n_mels=32",
                                   "optim.batch_size=8", "optim.max_steps=2", "train.log_every=1",
                                   "eval.batch_size=4", "tracking.enabled=false", f"runs_dir={tmp_path / 'runs'}"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sink = Console(file=io.StringIO(), width=120)
        run = train_in(recipe, Run.create(recipe), console=sink, out=sink).run
    finally:
        torch.set_num_threads(before)
    records = run.metrics()
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2] and run.meta()["status"] == "finished"
    # one view, no L_geo: the loss is EZ-VSL's two-way InfoNCE, at most 2 ln(8) for 8 clips at chance
    assert all(math.isfinite(r["loss"]) and "l_geo" not in r and r["loss"] == r["l_cl1"] for r in steps)
    tests = [r for r in records if r["kind"] == "test"]
    assert tests and {r["protocol"] for r in tests} == {"ezvsl"} and {r["n"] for r in tests} == {4}
