"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright.

`make test` installs chromium when /usr/bin/chromium is missing; without it this test fails
(it must never pass unseen). The page is served as static files, the API by serve.py.
"""
import base64
import json
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

pytest.register_assert_rewrite("tests.serve_helpers")  # imported below and as a plugin
from tests.serve_helpers import ROOT, scene_image

pytest_plugins = ["tests.serve_helpers"]               # the shared `servers` fixture

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records every change of the answer box, so the test can tell streaming from one final write.
RECORD = """() => {
  window.__answers = [];
  new MutationObserver(() => window.__answers.push(document.getElementById('answer').textContent))
    .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});
}"""

# Drops a PNG (base64) on the drop zone, as dragging a file from the desktop does.
DROP = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
}"""


# Records the `image` fields of each form the page sends (the browser does not show a file
# upload's body to Playwright).
SENT = """() => {
  const real = window.fetch;
  window.__sent = [];
  window.fetch = (url, options) => {
    if (options && options.body instanceof FormData) window.__sent.push(options.body.getAll('image').map((f) => f.name));
    return real(url, options);
  };
}"""


def test_page_uploads_asks_and_streams(servers, tmp_path):
    assert CHROMIUM.exists(), "Chromium is missing: run `make test` (it installs it) or apt-get install chromium"
    picture, second = tmp_path / "scene.png", tmp_path / "second.png"
    picture.write_bytes(scene_image(5, size=128, fmt="PNG"))
    second.write_bytes(scene_image(7, size=128, fmt="PNG"))
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(f"{servers.web}/index.html?api={servers.base}")
            expect(page.locator("#health")).to_have_text("模型已就绪：tiny", timeout=15000)
            expect(page.locator("#prompt")).to_have_value("描述这张图片")

            page.locator("#ask").click()                            # no image yet: a clear message
            expect(page.locator("#error")).to_have_text("请先选择一张图片。")

            page.set_input_files("#file", str(picture))
            expect(page.locator("#thumbs img")).to_have_count(1)
            expect(page.locator("#thumbs img").first).to_be_visible()
            page.fill("#max-tokens", "200")
            page.locator("#temperature").fill("1")                  # varied tokens: visible text
            page.fill("#seed", "3")                                  # the same sample on every run
            page.evaluate(RECORD)
            page.locator("#ask").click()
            expect(page.locator("#status")).to_contain_text("完成：200 个 token", timeout=30000)
            answers = page.evaluate("window.__answers")
            final = page.locator("#answer").text_content()
            assert final and len(answers) >= 5, answers            # many partial updates, not one write
            growing = [a for a in answers if a]
            assert all(final.startswith(a) for a in growing)        # each update extends the last one
            expect(page.locator("#history li")).to_have_count(1)
            expect(page.locator("#history li .q")).to_have_text("描述这张图片")
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)

            first = page.locator("#thumbs img").first.get_attribute("src")
            page.evaluate(DROP, base64.b64encode(scene_image(6, size=128, fmt="PNG")).decode())
            expect(page.locator("#thumbs img")).to_have_count(2)      # dropped: a second image
            page.locator("#thumbs .remove").first.click()             # remove the first one
            expect(page.locator("#thumbs img")).to_have_count(1)
            expect(page.locator("#thumbs img").first).not_to_have_attribute("src", first)
            page.set_input_files("#file", str(second))                # the file input adds to them
            expect(page.locator("#thumbs img")).to_have_count(2)
            page.fill("#prompt", "哪张图里有圆形？")
            page.evaluate(SENT)
            with page.expect_response("**/v1/generate-multipart") as answered:
                page.locator("#ask").click()
            expect(page.locator("#history li")).to_have_count(2, timeout=30000)
            assert page.evaluate("window.__sent") == [["dropped.png", "second.png"]]   # two `image` fields, in order
            final = [json.loads(line[6:]) for line in answered.value.text().splitlines()
                     if line.startswith("data: {")][-1]
            assert final["usage"]["prompt_tokens"] > 32               # both images' 16 tokens each
            expect(page.locator("#history li .q").first).to_have_text("哪张图里有圆形？")
            expect(page.locator("#history li").first.locator("img")).to_have_count(2)
            expect(page.locator("#status")).to_contain_text("完成：200 个 token")
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "web-two-images.png"), full_page=True)

            page.set_input_files("#file", [str(picture)] * 3)         # past the server's 4: refused on the page
            expect(page.locator("#thumbs img")).to_have_count(4)
            expect(page.locator("#error")).to_contain_text("一次最多只能提问 4 张图片")
            for _ in range(4):
                page.locator("#thumbs .remove").first.click()
            expect(page.locator("#thumbs li")).to_have_count(0)
            page.set_input_files("#file", str(not_image))          # the server's Chinese error is shown
            page.locator("#ask").click()
            expect(page.locator("#error")).to_contain_text("无法识别这张图片")
            expect(page.locator("#history li")).to_have_count(2)
            page.screenshot(path=str(ARTIFACTS / "web-error.png"), full_page=True)
        finally:
            browser.close()
