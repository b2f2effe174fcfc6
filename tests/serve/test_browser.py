"""The page at `/` in a real headless browser (Debian's chromium through Selenium) against a real server: type a
prompt, pick two sizes, both stream, and each shows its size's own greedy output."""

from __future__ import annotations

import shutil

import pytest

from _loopback import LoopbackServer
from _tiny_ckpt import make_checkpoint
from matryoshka_lm.core.checkpoint import load_model, load_tokenizer
from matryoshka_lm.core.spec import parse_spec
from matryoshka_lm.infer.engine import Engine
from matryoshka_lm.infer.sampling import GREEDY
from matryoshka_lm.serve.app import create_app

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver: apt-get install chromium chromium-driver"
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_file):
    return make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny", corpus_file)


@pytest.fixture(scope="module")
def server(ckpt):
    with LoopbackServer(create_app(ckpt)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # an explicit driver: nothing is downloaded
    yield driver
    driver.quit()


def greedy(ckpt, prompt: str, size: str, n: int) -> str:
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    eot = tok.token_to_id("<|endoftext|>")
    done = Engine(model).generate(
        [tok.encode(prompt).ids], parse_spec(model.cfg, size), n, GREEDY, stop_tokens=[eot], decode=tok.decode
    )
    return done[0].text


def wait(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda d: condition(d))


def test_two_sizes_stream_side_by_side(server, browser, ckpt):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    by_id = lambda i: browser.find_element(By.ID, i)
    wait(browser, lambda d: by_id("size-a").get_attribute("data-ready") == "1")
    options = [o.text for o in Select(by_id("size-a")).options]
    assert {"XL", "S", "M@int4", "auto"} <= set(options)
    prompt = "The class statement"
    by_id("prompt").clear()
    by_id("prompt").send_keys(prompt)
    Select(by_id("size-a")).select_by_visible_text("XL")
    Select(by_id("size-b")).select_by_visible_text("S")
    for field, value in (("max-tokens", "12"), ("temperature", "0")):
        by_id(field).clear()
        by_id(field).send_keys(value)
    by_id("run").click()
    wait(browser, lambda d: by_id("stat-a").get_attribute("data-done") and by_id("stat-b").get_attribute("data-done"))
    for pane, size in (("a", "XL"), ("b", "S")):
        stat = by_id(f"stat-{pane}").text
        assert stat.startswith("done: 12 tokens") and stat.endswith(f"served by {size}"), stat
        assert "tokens/s" in stat
        # the page shows exactly what the size generates (whitespace as the DOM renders it)
        assert by_id(f"out-{pane}").get_attribute("textContent") == greedy(ckpt, prompt, size, 12)


def test_a_typed_spec_and_a_bad_one(server, browser):
    from selenium.webdriver.common.by import By

    by_id = lambda i: browser.find_element(By.ID, i)
    browser.get(server.url + "/")
    wait(browser, lambda d: by_id("size-a").get_attribute("data-ready") == "1")
    by_id("spec-a").send_keys("S,M,L,XL@int4")
    by_id("spec-b").send_keys("M@int1")
    by_id("max-tokens").clear()
    by_id("max-tokens").send_keys("4")
    by_id("run").click()
    wait(browser, lambda d: by_id("stat-a").get_attribute("data-done") and by_id("stat-b").get_attribute("data-done"))
    assert "served by f" in by_id("stat-a").text and by_id("stat-a").text.endswith("@int4")
    assert by_id("stat-b").text.startswith("error:") and "int1" in by_id("stat-b").text
