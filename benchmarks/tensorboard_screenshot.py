"""A screenshot of TensorBoard on an experiment, taken by headless Chromium: what a user sees.

    python benchmarks/tensorboard_screenshot.py runs/quickstart-20261202-101500 \\
        --out benchmarks/results/tensorboard_scalars.png [--page scalars|hparams]

TensorBoard is started on a free port of 127.0.0.1 and stopped by its PID
(tests/tensorboard_client.py); the runs and scalar tags it serves are printed
beside the screenshot. Needs Chromium (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tensorboard_client import scalar_tags, tensorboard_server  # noqa: E402


def screenshot(url: str, out: str, size: str, wait_ms: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH (Debian: apt-get install -y chromium)")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={size}",
        # the page's scripts run for this long (virtual time) before the picture
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={os.path.abspath(out)}",
        url,
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("experiment", help="an experiment (or any TensorBoard logdir)")
    p.add_argument("--out", default="benchmarks/results/tensorboard_scalars.png")
    p.add_argument("--page", default="scalars", help="TensorBoard's page: scalars, hparams, ...")
    p.add_argument("--size", default="1400,1000", help="window width,height")
    p.add_argument("--wait-ms", type=int, default=20000)
    args = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tensorboard_server(args.experiment) as url:
        for run, tags in scalar_tags(url).items():
            print(f"{run}: {len(tags)} scalar tags, first {tags[:3]}")
        screenshot(f"{url}/#{args.page}", args.out, args.size, args.wait_ms)
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
