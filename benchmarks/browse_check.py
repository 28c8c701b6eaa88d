"""Benchmark-time check of `ksae browse` in a real browser (not a CI dependency): headless
Chromium (Debian's `chromium`) opens every page of a report and takes a screenshot, which must
show content (not a blank page).

    apt-get install chromium
    python -m benchmarks.browse_check runs/sae/browse [more report folders]

Prints, per page, the share of pixels that are not background, and writes
benchmarks/results/DATE_MACHINE/browse_check.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib import image as mpimg

from benchmarks.measure import results_folder

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,2400"]


def screenshot(page: Path, png: Path, profile: Path) -> None:
    subprocess.run(["chromium", *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def content_share(png: Path) -> float:
    """Share of pixels that differ from the page background (the most common colour)."""
    img = mpimg.imread(png)[..., :3]
    flat = img.reshape(-1, 3)
    colours, counts = np.unique((flat * 255).astype(np.uint8), axis=0, return_counts=True)
    background = colours[counts.argmax()].astype(np.float32) / 255
    return float(np.mean(np.abs(flat - background).sum(1) > 0.05))


def main(folders: list[str]) -> dict:
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in map(Path, folders):
            for page in sorted(folder.glob("*.html")):
                png = Path(tmp) / f"{folder.name}_{page.stem}.png"
                screenshot(page, png, Path(tmp) / "profile")
                share = content_share(png)
                floor = 0.001 if page.stem == "index" else 0.01  # the index is a few links
                name = f"{folder.name}/{page.name}"  # no machine paths in the committed JSON
                report[name] = {"content_share": share, "non_blank": share > floor}
                print(f"{page}: {100 * share:.1f}% of the screenshot is content")
                if page.stem != "index":
                    (folder / f"{page.stem}_screenshot.png").write_bytes(png.read_bytes())
    out = results_folder() / "browse_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
