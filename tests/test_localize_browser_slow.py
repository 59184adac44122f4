"""index.html of ``sslt localize`` in a real headless browser (Debian's chromium): every video decodes its first
picture, every image loads, and the screenshot shows the page (not a blank one). Slow: ``pytest -m slow``."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sslt_cli.config import Recipe, recipe_dict
from sslt_cli.data.synthetic import moving_clip
from sslt_cli.localize import localize
from sslt_cli.media import write_video
from sslt_cli.model import build_model

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=15000"]


def chromium(*args: str) -> str:
    result = subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_index_page_loads_every_video_and_picture_in_chromium(tmp_path: Path) -> None:
    from PIL import Image

    torch.manual_seed(0)
    recipe = Recipe.model_validate({"data": {"image_size": 64}, "audio": {"clip_seconds": 1.0, "hop_length": 956,
                                                                           "n_mels": 40}})
    torch.save({"format": "sslt-checkpoint/1", "model": build_model().state_dict(), "step": 1, "epoch": 0,
                "recipe": recipe_dict(recipe)}, tmp_path / "tiny.pt")
    videos = []
    for label in (0, 6):
        clip = moving_clip(1, label, seconds=3.0)
        videos.append(write_video(tmp_path / f"scene{label}.mp4", clip.frames, clip.fps, clip.audio[None],
                                  clip.sample_rate))
    result = localize(tmp_path / "tiny.pt", [*videos, tmp_path / "missing.mp4"], tmp_path / "loc")
    assert len(result.failed) == 1
    page = (tmp_path / "loc" / "index.html").as_uri()

    dom = chromium("--dump-dom", page)
    status = re.search(r'<p id="status" data-loaded="(\d+)" data-total="(\d+)">([^<]*)</p>', dom)
    assert status is not None, dom[:2000]
    # two inputs x (overlay video, contact sheet, plot)
    assert status.groups() == ("6", "6", "media loaded: 6 of 6")
    assert dom.count("<video") == 2 and "missing.mp4: no such file or folder" in dom

    shot = tmp_path / "screenshot.png"
    chromium("--window-size=1280,1600", f"--screenshot={shot}", page)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 30  # not a blank page
    # the heatmap overlays are on screen: saturated jet reds and blues, which the page's own styling never uses
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80) & (pixels[..., 1] < 120)
    assert red.mean() > 0.005 and blue.mean() > 0.005, (red.mean(), blue.mean())
