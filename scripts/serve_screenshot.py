"""Take docs/serve-screenshot.png: the page of `loraqa serve` answering the page's own example (the first SQuAD
dev paragraph and three of its questions) with a run, in headless Chromium driven by Selenium, as the browser
test drives it. The server listens on a free loopback port and stops when the picture is taken.

    .venv/bin/python scripts/serve_screenshot.py examples/smollm2-squad --out docs/serve-screenshot.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WAIT = 300  # seconds: a 135M model on a busy 2-core CPU answers three questions well within this


def chrome(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not chromium or not Path(driver).exists():
        sys.exit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def shrink_png(path: Path) -> None:
    """Re-save with a 256-colour palette (a page of flat colours loses nothing visible) when Pillow is there."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run folder, e.g. examples/smollm2-squad")
    p.add_argument("--out", default="docs/serve-screenshot.png")
    p.add_argument("--width", type=int, default=960)
    args = p.parse_args()

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from loraqa.answering import load_answerer
    from loraqa.serve import BackgroundServer, create_app

    app = create_app(load_answerer(args.run_dir), run_dir=args.run_dir)
    browser = chrome(args.width, 1400)
    try:
        with BackgroundServer(app) as live:
            browser.get(f"{live.url}/")
            wait = WebDriverWait(browser, WAIT)
            wait.until(lambda d: "adapter" in d.find_element(By.ID, "run").text)
            browser.find_element(By.ID, "example").click()
            browser.find_element(By.ID, "ask").click()
            wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#highlighted mark")))
            wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(args.width, height + 10)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(out))
            for item in browser.find_elements(By.CSS_SELECTOR, "#answers li"):
                print(item.text)
    finally:
        browser.quit()
    shrink_png(out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
