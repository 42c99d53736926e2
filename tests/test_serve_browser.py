"""The page of `t2tvit serve` in a real browser: headless Chromium (the system's `chromium` and its
`chromedriver`, driven by Selenium) uploads a sample and gets the top-5 bars, the rollout overlay and
the T2T feature maps. `make test` installs chromium on Debian (`make browser`); elsewhere the test skips
and says why."""
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip('fastapi', reason="t2tvit serve needs FastAPI (pip install 't2tvit[serve]')")
webdriver = pytest.importorskip('selenium.webdriver', reason='the browser test needs selenium (pip install selenium)')

from serve_helpers import DIGITS, Server, save_small_model  # noqa: E402

# the README's picture is made by this test: T2TVIT_SCREENSHOT_DIR=docs keeps the screenshot there too, and
# T2TVIT_SCREENSHOT_CHECKPOINT=runs/demo/best.pth serves the demo's trained model instead of a random one
SCREENSHOT_DIR = os.environ.get('T2TVIT_SCREENSHOT_DIR')
SCREENSHOT_CHECKPOINT = os.environ.get('T2TVIT_SCREENSHOT_CHECKPOINT')


def _browser_paths():
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not chromium or not driver:
        pytest.skip('the browser test needs Debian\'s chromium and chromedriver: `make browser` '
                    '(apt-get install chromium chromium-driver)')
    return chromium, driver


def _chrome(chromium: str, driver: str):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = chromium
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                '--window-size=1200,1500', '--no-first-run'):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_page_uploads_an_image_and_shows_top5_and_overlay(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from t2tvit.serve.samples import samples
    chromium, driver = _browser_paths()
    checkpoint = SCREENSHOT_CHECKPOINT or save_small_model(tmp_path / 'digits.safetensors')
    upload = tmp_path / 'digit_4.png'
    upload.write_bytes(samples()['digit_4'][0])
    server = Server(['--checkpoint', str(checkpoint)])
    browser = _chrome(chromium, driver)
    try:
        browser.get(server.url + '/')
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: 't2t_vit_lite_32' in b.find_element(By.ID, 'model-line').text)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#samples button')) >= 4)
        browser.find_element(By.ID, 'file').send_keys(str(upload))
        wait.until(lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-done') == 'digit_4.png')
        rows = browser.find_elements(By.CSS_SELECTOR, '#topk li')
        assert len(rows) == 5
        labels = [r.find_element(By.CLASS_NAME, 'bar-label').text for r in rows]
        assert set(labels) <= set(DIGITS) and len(set(labels)) == 5
        widths = [r.find_element(By.CLASS_NAME, 'bar').size['width'] for r in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1] > 0
        for picture in ('overlay', 'features'):
            img = browser.find_element(By.ID, picture)
            assert img.is_displayed(), picture
            assert browser.execute_script('return arguments[0].naturalWidth', img) >= 256, picture
        # a built-in sample goes through the same path
        browser.find_element(By.CSS_SELECTOR, '#samples button[data-sample="sunny_field"]').click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-done') == 'sunny_field.png')
        assert len(browser.find_elements(By.CSS_SELECTOR, '#topk li')) == 5
        browser.find_element(By.ID, 'file').send_keys(str(upload))
        wait.until(lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-done') == 'digit_4.png')
        shot = tmp_path / 'serve_page.png'
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if SCREENSHOT_DIR:
            Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(SCREENSHOT_DIR) / 'serve_page.png')
    finally:
        browser.quit()
        server.stop()
