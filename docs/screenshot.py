"""Render the first screen of a real run's report.html to docs/report-first-screen.png.

    python docs/screenshot.py                  # runs the smoke preset into a temporary folder
    python docs/screenshot.py --run runs/quick # or uses a finished run

Needs headless Chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (default: run the smoke preset)")
    parser.add_argument("--out", type=Path, default=HERE / "report-first-screen.png")
    parser.add_argument("--size", default="1200,900", help="window width,height in pixels")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("needs headless Chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            subprocess.run(
                ["mia-audit", "run", "--preset", "smoke", "--out", str(run), "--quiet"], check=True
            )
        page = (run / "report.html").resolve()
        if not page.is_file():
            print(f"{page} does not exist", file=sys.stderr)
            return 2
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={args.size}",
                f"--screenshot={args.out.resolve()}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
