"""Screenshots for the README, taken from a running demo (``scripts/demo --screenshots docs``):
the terminal view rendered at 80x24 to SVG by rich, then to PNG by headless Chromium, and the
processor's dashboard through Selenium with Debian's chromedriver (nothing is downloaded)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console

from scripts.demolib.view import Snapshot, render

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run")  # fmt: skip


def terminal_png(snapshot: Snapshot, out: Path) -> None:
    console = Console(record=True, width=80, height=24, force_terminal=True, file=io.StringIO())
    console.print(render(snapshot), height=24)
    with tempfile.TemporaryDirectory() as tmp:
        svg = Path(tmp) / "view.svg"
        console.save_svg(str(svg), title="./scripts/demo")
        m = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text())
        w, h = (int(float(m.group(1))) + 1, int(float(m.group(2))) + 1) if m else (1000, 640)
        html = Path(tmp) / "view.html"
        page = f'<html><body style="margin:0"><img src="view.svg" width="{w}"></body></html>'
        html.write_text(page)
        subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--window-size={w},{h}", f"--screenshot={out}", html.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def dashboard_png(url: str, out: Path, settle: float = 8.0) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, were it asked: no downloads
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (*FLAGS, "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(url)
        time.sleep(settle)  # the page loads its history and joins the live feed
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
