"""The page of loraqa serve in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
Selenium types a paragraph and a question, submits, and reads the highlighted answer.

Without Chromium, chromedriver or Selenium the test is skipped, except in CI (the CI variable set), where it
fails: CI must run it (.ci/run installs them)."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from helpers import ALL_COLOURS, COLOUR_QUESTIONS
from loraqa.answering import load_answerer
from loraqa.serve import BackgroundServer, create_app

WAIT = 60  # seconds for anything the page does
DEBIAN_DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def need(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what}: the browser test must run in CI (install chromium and chromium-driver)")
    pytest.skip(f"{what}; apt-get install chromium chromium-driver to run the browser test")


def find_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next((p for p in DEBIAN_DRIVERS if os.path.exists(p)), None)
    if not chromium or not driver:
        need("no chromium or chromedriver on this machine")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = find_browser()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(flag)
    # the driver named, so Selenium Manager never looks for one on the network
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def live(answering_run):
    with BackgroundServer(create_app(load_answerer(str(answering_run)), run_dir=answering_run)) as server:
        yield server


def test_the_page_highlights_the_answer_the_api_gives(browser, live, answering_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # a question whose answer (a colour word) the API finds in this paragraph, so the page has something to mark
    answers = httpx.post(f"{live.url}/v1/answer", json={"context": ALL_COLOURS, "questions": COLOUR_QUESTIONS},
                         timeout=WAIT).json()["answers"]  # fmt: skip
    api = next((a for a in answers if a["span"] is not None), None)
    assert api, f"the tiny reader answered no word of its paragraph: {[a['answer'] for a in answers]}"
    question = api["question"]

    browser.get(f"{live.url}/")
    wait = WebDriverWait(browser, WAIT)
    # the page names the run: base model, adapter (the run folder), EM/F1 from its metrics.json
    metrics = json.loads((answering_run / "metrics.json").read_text())
    run_line = wait.until(lambda d: "adapter" in d.find_element(By.ID, "run").text and d.find_element(By.ID, "run"))
    assert "tiny-random-gpt2" in run_line.text and answering_run.name in run_line.text
    assert f"EM {metrics['exact_match']:.2f} / F1 {metrics['f1']:.2f}" in run_line.text

    browser.find_element(By.ID, "context").send_keys(ALL_COLOURS)
    browser.find_element(By.ID, "questions").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    mark = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#highlighted mark")))
    assert mark.text == api["answer"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#highlighted mark")) == 1
    item = browser.find_element(By.CSS_SELECTOR, "#answers li")
    assert question in item.text and api["answer"] in item.text
    # the paragraph shown is the one typed, marked where the API's span says (its tag "1" after the mark)
    end = api["span"][1]
    assert browser.find_element(By.ID, "highlighted").text == ALL_COLOURS[:end] + "1" + ALL_COLOURS[end:]


def test_the_page_shows_the_servers_error(browser, live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live.url}/")
    context = browser.find_element(By.ID, "context")
    browser.execute_script("arguments[0].value = arguments[1]", context, " ".join(["word"] * 600))
    browser.find_element(By.ID, "questions").send_keys("What?")
    browser.find_element(By.ID, "ask").click()
    status = WebDriverWait(browser, WAIT).until(
        lambda d: "tokens" in d.find_element(By.ID, "status").text and d.find_element(By.ID, "status")
    )
    assert "context: is over the model's length: at most 446 tokens, got 600" in status.text
    assert "error" in status.get_attribute("class")
