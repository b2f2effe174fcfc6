"""Regenerate docs/serve_page.png: the page at `/` comparing two sizes of a checkpoint, in headless chromium.

Run: .venv/bin/python scripts/screenshot_page.py [CKPT]   (default runs/router-demo; needs chromium-driver)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _loopback import LoopbackServer  # noqa: E402
from matryoshka_lm.serve.app import create_app  # noqa: E402


def main() -> None:
    ckpt = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "router-demo")
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,820"):
        opts.add_argument(arg)
    with LoopbackServer(create_app(ckpt, name="demo")) as server:
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            driver.get(server.url + "/")
            by_id = lambda i: driver.find_element(By.ID, i)
            WebDriverWait(driver, 30).until(lambda d: by_id("size-a").get_attribute("data-ready") == "1")
            by_id("prompt").clear()
            by_id("prompt").send_keys("ROMEO:\nBut soft, what light")
            Select(by_id("size-a")).select_by_visible_text("XL")
            Select(by_id("size-b")).select_by_visible_text("S@int4")
            by_id("run").click()
            done = lambda d: by_id("stat-a").get_attribute("data-done") and by_id("stat-b").get_attribute("data-done")
            WebDriverWait(driver, 120).until(done)
            time.sleep(0.2)
            out = ROOT / "docs" / "serve_page.png"
            driver.save_screenshot(str(out))
            print(f"wrote {out}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
