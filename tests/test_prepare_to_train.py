"""What `sslt prepare vggsound` writes trains and evaluates with `sslt train` / `sslt eval` unchanged (issue 7)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from sslt_cli.cli import app
from test_prepare import make_clip

IDS = [f"vid{n:08d}_{n:06d}" for n in range(1, 15)]


def test_prepared_vggsound_trains_and_evaluates(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    first = make_clip(videos / f"{IDS[0]}.mp4")
    for clip_id in IDS[1:]:
        shutil.copy(first, videos / f"{clip_id}.mp4")
    train_ids, test_ids = IDS[:8], IDS[8:]
    (tmp_path / "train.txt").write_text("\n".join(train_ids) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(test_ids) + "\n")
    boxes = [{"file": i, "class": "stripes", "bbox": [[0.1, 0.2, 0.6, 0.9]]} for i in test_ids]
    (tmp_path / "vggss.json").write_text(json.dumps(boxes))
    runner = CliRunner()

    def sslt(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, f"{args}: {result.output} {result.exception!r}"
        return result.stdout

    sslt("prepare", "vggsound", "--videos", str(videos), "--out", "vggsound/train", "--split", "train",
         "--list", str(tmp_path / "train.txt"), "--workers", "1")
    sslt("prepare", "vggsound", "--videos", str(videos), "--out", "vggsound/test_vggss", "--split", "test",
         "--list", str(tmp_path / "test.txt"), "--vggss-json", str(tmp_path / "vggss.json"), "--workers", "1")
    assert len(list(Path("vggsound/train/total_video_frames").glob("*/125.jpg"))) == 8
    assert len(list(Path("vggsound/test_vggss/anno").glob("*.xml"))) == 6

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tie_full.yaml"
    sslt("train", str(recipe), "data.root=vggsound", "data.val=test_vggss", "data.test={vggss: test_vggss}",
         "data.labels=null", "data.image_size=64", "data.num_workers=0", "audio.n_mels=32", "audio.hop_length=956",
         "optim.batch_size=4", "optim.epochs=1", "transforms.mix.enabled=false", "eval.batch_size=6",
         "transforms.mask.time=20", "transforms.mask.freq=4", "tracking.enabled=false", "runs_dir=runs")
    run_dir = next(Path("runs").glob("tie_full-*"))
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"
    printed = sslt("eval", str(run_dir), "--which", "last")
    assert "test_vggss: last" in printed
    metrics = json.loads((run_dir / "eval" / "vggss-last-ssltie" / "metrics.json").read_text())
    assert metrics["accounting"]["scored"] == 6
