"""Regenerate the pictures in docs/images/ from real runs on the toy world, in headless Chromium.

    .venv/bin/python jobs/evaluate.py && .venv/bin/python scripts/docs_images.py report
        # docs/images/score_vs_n.png, per_task.png (copied from outputs/eval/report/) and report.png (the page)
    make serve   # in another shell; then
    .venv/bin/python scripts/docs_images.py playground
        # docs/images/playground.png: a toy test frame, its action, best_of 4, then one step of the rollout

The browser is the tests' (Debian's Chromium and chromedriver through selenium, tests/conftest.py). Every PNG
is reduced to a palette so it stays well under 200 KB in git.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"


def _browser(width: int, height: int):  # noqa: ANN202 (selenium is imported lazily)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))


def _small_png(src: Path, dst: Path, width: int | None = None) -> None:
    """Copy src to dst as a palette PNG (optionally scaled to `width`), so docs/images stays small."""
    with Image.open(src) as image:
        image = image.convert("RGB")
        if width and image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    print(f"{dst.relative_to(REPO)}: {dst.stat().st_size // 1024} KB")


def report(eval_dir: Path, max_height: int) -> None:
    page = eval_dir / "report" / "index.html"
    if not page.exists():
        sys.exit(f"no report at {page}: run .venv/bin/python jobs/evaluate.py first")
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name in ("score_vs_n.png", "per_task.png"):
        _small_png(page.parent / name, IMAGES / name)
    driver = _browser(1200, 900)
    try:
        driver.get(page.as_uri())
        height = min(max_height, driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1200, height)
        with tempfile.TemporaryDirectory() as tmp:
            shot = Path(tmp) / "report.png"
            driver.save_screenshot(str(shot))
            _small_png(shot, IMAGES / "report.png", width=900)
    finally:
        driver.quit()


def playground(url: str, bench: Path, item: int, best_of: int, seed: int, key: str, then: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cwm_ray.config import ToyWorldConfig
    from cwm_ray.toyworld.parser import parse_scene
    from cwm_ray.toyworld.world import random_action

    test = json.loads(bench.read_text())[item]
    frame = (bench.parent / test["input"]).resolve()
    IMAGES.mkdir(parents=True, exist_ok=True)
    driver = _browser(1100, 1000)
    wait = WebDriverWait(driver, 300)

    def predict(action: str, steps: int) -> None:
        driver.find_element(By.ID, "action").clear()
        driver.find_element(By.ID, "action").send_keys(action)
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history figure")) == steps + 1)
        error = driver.find_element(By.ID, "error").text
        if error:
            sys.exit(f"the playground says: {error}")

    try:
        driver.get(url.rstrip("/") + "/")
        driver.find_element(By.ID, "image").send_keys(str(frame))
        best = driver.find_element(By.ID, "best_of")
        best.clear()
        best.send_keys(str(best_of))
        driver.find_element(By.ID, "seed").send_keys(str(seed))
        if key:
            driver.find_element(By.ID, "key").send_keys(key)
        predict(test["prompt"], 1)
        # one more step from the chosen frame: an action of kind `then` that is valid in the scene the toy world's
        # parser reads from that frame
        chosen = driver.find_element(By.CSS_SELECTOR, "#history figure:last-child img").get_attribute("src")
        world = ToyWorldConfig(image_size=64, actions=[then])
        scene = parse_scene(Image.open(io.BytesIO(base64.b64decode(chosen.split(",", 1)[1]))), world)
        action = random_action(scene, random.Random(seed), world).text()
        driver.find_element(By.ID, "continue").click()
        predict(action, 2)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1100, min(height, 1400))
        with tempfile.TemporaryDirectory() as tmp:
            shot = Path(tmp) / "playground.png"
            driver.save_screenshot(str(shot))
            _small_png(shot, IMAGES / "playground.png", width=900)
        print(f"actions: {test['prompt']!r}, then {action!r} (best_of {best_of}, seed {seed})")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    rep = sub.add_parser("report", help="the evaluation report's plots and a screenshot of its page")
    rep.add_argument("--eval", type=Path, default=REPO / "outputs" / "eval", help="jobs/evaluate.py's output")
    rep.add_argument("--max-height", type=int, default=1700, help="crop the page screenshot at this many px")
    play = sub.add_parser("playground", help="a screenshot of the playground of a running app")
    play.add_argument("--url", default="http://127.0.0.1:8000")
    play.add_argument("--bench", type=Path, default=REPO / "outputs" / "toy_corpus" / "gold" / "test.json")
    play.add_argument("--item", type=int, default=0, help="which test item's frame and action")
    play.add_argument("--best-of", type=int, default=4)
    play.add_argument("--seed", type=int, default=0)
    play.add_argument("--key", default="", help="an API key, if the app has CWM_API_KEYS set")
    play.add_argument("--then", default="move", help="the kind of the second action (move, remove, add, ...)")
    args = parser.parse_args()
    if args.what == "report":
        report(args.eval, args.max_height)
    else:
        playground(args.url, args.bench, args.item, args.best_of, args.seed, args.key, args.then)


if __name__ == "__main__":
    main()
