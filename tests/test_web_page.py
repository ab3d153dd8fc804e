"""The web page of `unitoken serve`, driven in a real headless browser (Debian's Chromium through
Selenium and chromedriver): a question about an uploaded picture gets its answer on the page, and
a picture asked for (with a seed typed into the page) appears in the chat, the same picture the
API gives for the same call, and in the gallery; the API key is typed into the page."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import requests
from PIL import Image
from test_serve import KEY, MODEL, _Running

from unitoken_jax.serve import ServeSettings, create_app, wire
from unitoken_jax.world.shapes import GENERATE_TEMPLATE  # (the bundled model was trained with it)
from unitoken_jax.world import default, shapes
from unitoken_jax.world.shapes import Thing

webdriver = pytest.importorskip("selenium.webdriver")


def _browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def page():
    settings = ServeSettings(model_name=MODEL, api_key=KEY, default_size=(64, 64), sizes=((64, 64),))
    server = _Running(create_app(default.pipeline(), settings))
    browser = _browser()
    try:
        browser.get(server.url + "/")
        yield server, browser
    finally:
        browser.quit()
        server.stop()


def _sent_messages(monkeypatch) -> list:
    """The messages of each chat call the server parses from now on (the page's calls), in order."""
    sent, parse = [], wire.parse_chat
    monkeypatch.setattr(wire, "parse_chat", lambda body, *a: (sent.append(body["messages"]), parse(body, *a))[1])
    return sent


def _wait(browser, condition, seconds=120):
    """Polls `condition` until it returns something truthy. The page re-renders a message while it
    streams, so an element found in one poll can be gone when the next line reads it: that poll
    counts as not yet, not as a failure."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: condition(b))


def test_the_page_answers_a_question_about_an_uploaded_picture_and_draws(page, tmp_path):
    from selenium.webdriver.common.by import By

    server, browser = page
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)

    picture = tmp_path / "red.png"
    shapes.draw([Thing("red", "circle", "top left")]).save(picture)
    browser.find_element(By.ID, "picture").send_keys(str(picture))
    browser.find_element(By.ID, "question").send_keys("What colour is the shape?")
    browser.find_element(By.ID, "send").click()
    answer = _wait(browser, lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                                       if e.text and "streaming" not in e.get_attribute("class")] or None)
    assert answer == ["red"], browser.find_element(By.ID, "log").text
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img.sent")  # the uploaded picture is shown

    prompt = "a blue square at the bottom right"
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "draw-button").click()
    drawn = _wait(browser, lambda b: [e.get_attribute("src") for e in
                                      b.find_elements(By.CSS_SELECTOR, ".msg.assistant img.drawn")] or None)
    url = drawn[0]  # read inside the wait: a re-rendered message would leave a found element stale
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.size == (64, 64)
    assert shapes.check_picture(image).matches(Thing("blue", "square", "bottom right"))
    # the same call through the API (not streamed): the same picture
    text = GENERATE_TEMPLATE.format(w=64, h=64, prompt=prompt)  # what the page sends, guided as images are
    answer = requests.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": MODEL, "seed": 7, "guidance_scale": 3,
                                 "messages": [{"role": "user", "content": text}]}).json()
    (api_url,) = re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", json.dumps(answer))
    api_image = Image.open(io.BytesIO(base64.b64decode(api_url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(api_image.convert("RGB")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_element(By.ID, "model").text == MODEL


def test_the_page_sends_the_conversation_so_far_until_a_new_chat(page, tmp_path, monkeypatch):
    """A follow-up question goes with the turns before it (the picture and the answer), as a chat
    does; "New chat" starts again from nothing. The server's parser records what the page sent."""
    from selenium.webdriver.common.by import By

    server, browser = page
    sent = _sent_messages(monkeypatch)
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_element(By.ID, "log").text == ""

    def ask(question, picture=None):
        before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        if picture is not None:
            browser.find_element(By.ID, "picture").send_keys(str(picture))
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        return _wait(browser, lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                                         if "streaming" not in e.get_attribute("class")][before:] or None)

    picture = tmp_path / "green.png"
    shapes.draw([Thing("green", "square", "top right")]).save(picture)
    assert ask("What colour is the shape?", picture) == ["green"]
    ask("What colour is the shape?")
    first, follow_up = sent[-2:]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[:1] == first and follow_up[0]["content"][0]["type"] == "image_url"
    assert follow_up[1]["content"] == [{"type": "text", "text": "green"}]
    browser.find_element(By.ID, "new-chat").click()
    ask("What colour is the shape?")
    assert [m["role"] for m in sent[-1]] == ["user"] and len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def test_the_page_needs_no_key_but_its_calls_do(page):
    server, _ = page
    assert requests.get(server.url + "/").status_code == 200
    assert requests.get(server.url + "/v1/models").status_code == 401


def _ask_page(browser, question, picture=None, clicks=1):
    """Types a question (and attaches a picture) and clicks Send `clicks` times at once (as a
    double click does: both before the page has read the picture)."""
    from selenium.webdriver.common.by import By

    if picture is not None:
        browser.find_element(By.ID, "picture").send_keys(str(picture))
    browser.find_element(By.ID, "question").send_keys(question)
    browser.execute_script("for (let i = 0; i < arguments[1]; i++) arguments[0].click();",
                           browser.find_element(By.ID, "send"), clicks)


def _answers(browser):
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            if "streaming" not in e.get_attribute("class")]


def _fresh(browser):
    from selenium.webdriver.common.by import By

    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    browser.find_element(By.ID, "new-chat").click()


def test_a_double_click_asks_once_and_a_new_chat_drops_the_answer_still_coming(page, tmp_path, monkeypatch):
    """Send clicked twice with a picture attached sent the question twice (the button was disabled
    only after the picture was read) and put both answers in the history. "New chat" pressed while
    an answer is coming (the link slowed to 1.5 s each way) put that answer into the new
    conversation, with the old question in the next call's history."""
    from selenium.webdriver.common.by import By

    server, browser = page
    sent = _sent_messages(monkeypatch)
    _fresh(browser)
    picture = tmp_path / "red.png"
    shapes.draw([Thing("red", "circle", "top left")]).save(picture)
    _ask_page(browser, "What colour is the shape?", picture, clicks=2)
    assert _wait(browser, lambda b: _answers(b) or None) == ["red"]
    _ask_page(browser, "What colour is the shape?")
    _wait(browser, lambda b: len(_answers(b)) == 2)
    assert len(sent) == 2 and [m["role"] for m in sent[-1]] == ["user", "assistant", "user"], sent
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 1500,
                                                                 "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        _ask_page(browser, "What colour is the shape?")
        browser.find_element(By.ID, "new-chat").click()
        import time

        time.sleep(4)  # the call's answer would have come back by now
        assert browser.find_element(By.ID, "log").text == ""
        assert browser.find_element(By.ID, "send").is_enabled()
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                                     "downloadThroughput": -1, "uploadThroughput": -1})
    before = len(sent)
    _ask_page(browser, "What colour is the shape?")
    _wait(browser, lambda b: len(_answers(b)) == 1)
    assert [m["role"] for m in sent[before:][-1]] == ["user"]
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def test_a_conversation_that_outgrows_the_server_leaves_out_its_oldest_turns_and_says_so(page, tmp_path,
                                                                                          monkeypatch):
    """Past the server's pictures a call (2 here), every question failed until "New chat": the page
    now leaves the oldest turns out and says so. An answer cut by its budget is marked as cut (it
    was shown as if complete). A server restarted under another model name is asked its name again
    (every call failed until the page was reloaded)."""
    from selenium.webdriver.common.by import By

    server, browser = page
    settings = server.app.state.server.settings
    monkeypatch.setattr(settings, "limits", wire.Limits(max_images=2))
    _fresh(browser)
    pictures = []
    for i, colour in enumerate(("red", "green", "blue")):
        pictures.append(tmp_path / f"{colour}.png")
        shapes.draw([Thing(colour, "square", "top left")]).save(pictures[-1])
    for i, (colour, picture) in enumerate(zip(("red", "green", "blue"), pictures)):
        _ask_page(browser, "What colour is the shape?", picture)
        assert _wait(browser, lambda b: _answers(b)[i:] or None) == [colour]
    notes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.note")]
    assert notes == ["(the 1 oldest question and answer was left out: the conversation no longer fits the model)"]
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    # the server's body limit too (every earlier picture is sent again): a third picture had been
    # refused with 413, and every one after it, until "New chat"
    monkeypatch.setattr(settings, "limits", wire.Limits())
    noise = []
    for i in range(3):
        noise.append(tmp_path / f"noise{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8)).save(noise[-1])
    one = len(base64.b64encode(noise[0].read_bytes()))
    monkeypatch.setattr(settings, "max_body_bytes", int(2.5 * one))  # two pictures a call, not three
    _fresh(browser)
    for i, picture in enumerate(noise):
        _ask_page(browser, "What colour is the shape?", picture)
        _wait(browser, lambda b: len(_answers(b)) == i + 1 or b.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), browser.find_element(By.ID, "log").text
    notes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.note")]
    assert notes == ["(the 1 oldest question and answer was left out: the conversation no longer fits the model)"]
    monkeypatch.setattr(settings, "max_body_bytes", 32 * 1024 * 1024)

    sent, parse = [], wire.parse_chat

    def short(body, *a):  # every answer gets one token
        sent.append(body)
        return parse({**body, "max_tokens": 1}, *a)

    monkeypatch.setattr(wire, "parse_chat", short)
    _fresh(browser)  # (the page asks the model's name as the key is typed: renamed after that)
    _wait(browser, lambda b: b.find_element(By.ID, "model").text == MODEL)
    monkeypatch.setattr(settings, "model_name", "shapes-renamed")
    _ask_page(browser, "Describe the picture.", pictures[0])
    answer = _wait(browser, lambda b: _answers(b) or None)[0]
    assert answer.endswith("(the answer was cut off here: it reached its length limit)"), answer
    assert sent[-1]["model"] == "shapes-renamed"
    assert browser.find_element(By.ID, "model").text == "shapes-renamed"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def test_several_pictures_a_question_drawings_asked_about_and_files_refused_before_they_are_sent(page, tmp_path,
                                                                                                  monkeypatch):
    """The page took one picture a question (the API takes several); a picture once chosen could
    not be left out; a question after a drawing went without the drawing (answered about an older
    picture); a file the server refuses was sent whole (twice, when too big) and refused by the API's
    field path; the Send button kept the focus from the question; a narrow window cut the gallery."""
    from selenium.webdriver.common.by import By

    server, browser = page
    sent = _sent_messages(monkeypatch)
    _fresh(browser)
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    shapes.draw([Thing("red", "circle", "top left")]).save(red)
    shapes.draw([Thing("blue", "square", "bottom right")]).save(blue)
    browser.find_element(By.ID, "picture").send_keys(f"{red}\n{blue}")
    assert browser.find_element(By.ID, "attached-names").text == "red.png, blue.png"
    _ask_page(browser, "How many shapes are there?")
    _wait(browser, lambda b: _answers(b) or None)
    assert [part["type"] for part in sent[-1][-1]["content"]] == ["image_url", "image_url", "text"]
    assert [base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) for part in sent[-1][-1]["content"][:2]] == \
        [red.read_bytes(), blue.read_bytes()]  # in the order chosen
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].find_elements(By.TAG_NAME, "img")) == 2
    assert browser.switch_to.active_element.get_attribute("id") == "question"  # ready for the next question
    # a picture chosen, then removed: the question goes without it
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "picture").send_keys(str(red))
    browser.find_element(By.ID, "detach").click()
    assert not browser.find_element(By.ID, "attached").is_displayed()
    _ask_page(browser, "What colour is the shape?")
    _wait(browser, lambda b: _answers(b) or None)
    assert [part["type"] for part in sent[-1][-1]["content"]] == ["text"]
    # a drawing is part of the conversation: the question after it goes with it
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "prompt").send_keys("a blue square at the bottom right")
    browser.find_element(By.ID, "seed").clear()
    browser.find_element(By.ID, "seed").send_keys("7")  # (the first test's drawing: a blue square there)
    browser.find_element(By.ID, "draw-button").click()
    url = _wait(browser, lambda b: [e.get_attribute("src") for e in
                                    b.find_elements(By.CSS_SELECTOR, ".msg.assistant img.drawn")] or None)[0]
    _ask_page(browser, "What colour is the shape?")
    _wait(browser, lambda b: len(_answers(b)) == 2)
    drawn = sent[-1]
    assert [m["role"] for m in drawn] == ["user", "assistant", "user"], drawn
    assert drawn[0]["content"][0]["text"].endswith("a blue square at the bottom right")
    assert [part["image_url"]["url"] for part in drawn[1]["content"]] == [url]
    reading = shapes.check_picture(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert reading.colour is not None and _answers(browser)[-1] == reading.colour  # about the drawing
    # files the server would refuse are said by name, and nothing is sent
    calls = len(sent)
    (tmp_path / "notes.txt").write_text("not a picture")
    _ask_page(browser, "What is this?", tmp_path / "notes.txt")
    error = _wait(browser, lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.error")] or None)
    assert error == ["notes.txt is not a PNG, JPEG, WebP or GIF picture"] and len(sent) == calls
    # one the page cannot tell (a .png that is not one) is refused by the server: said with its name,
    # not the API's field path (messages[0].content[0].image_url)
    (tmp_path / "fake.png").write_bytes(b"not a picture")
    browser.find_element(By.ID, "detach").click()  # (the refused choice stays, to be removed)
    _ask_page(browser, "What is this?", tmp_path / "fake.png")
    error = _wait(browser, lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.error")][1:] or None)
    assert error == ["fake.png: not a picture (PNG, JPEG, WebP or GIF)"] and len(sent) == calls + 1
    calls = len(sent)
    settings = server.app.state.server.settings
    monkeypatch.setattr(settings, "limits", wire.Limits(max_image_bytes=100))  # (the page says it as it loads)
    browser.refresh()
    _fresh(browser)
    _ask_page(browser, "What colour is the shape?", red)
    error = _wait(browser, lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.error")] or None)
    assert error == [f"red.png is {red.stat().st_size} bytes; this server takes pictures of at most 100"]
    assert len(sent) == calls
    # a phone's width: the gallery goes below the chat, as wide as it
    size = browser.get_window_size()
    try:
        browser.set_window_size(375, 800)
        chat, gallery = (browser.find_element(By.TAG_NAME, tag).rect for tag in ("main", "aside"))
        assert gallery["y"] >= chat["y"] + chat["height"] - 1 and gallery["width"] >= 0.9 * chat["width"], \
            (chat, gallery)
    finally:
        browser.set_window_size(size["width"], size["height"])
    monkeypatch.undo()
    browser.refresh()


def test_a_question_of_several_lines_and_a_conversation_that_survives_a_reload(page, tmp_path, monkeypatch):
    """The question box was a one-line input (no question of several lines; Shift+Enter sent) and a
    reload lost the conversation: now Shift+Enter starts a line and Enter sends, and the tab keeps
    the conversation (what the log showed and the turns a follow-up goes with) until "New chat"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server, browser = page
    sent = _sent_messages(monkeypatch)
    _fresh(browser)
    picture = tmp_path / "green.png"
    shapes.draw([Thing("green", "square", "top right")]).save(picture)
    browser.find_element(By.ID, "picture").send_keys(str(picture))
    box = browser.find_element(By.ID, "question")
    box.send_keys("What colour", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "is the shape?")
    assert not sent and box.get_attribute("value") == "What colour\nis the shape?"  # (not sent yet)
    one_line = box.size["height"]
    box.send_keys(Keys.ENTER)
    first = _wait(browser, lambda b: _answers(b) or None)
    assert sent[-1][0]["content"][-1] == {"type": "text", "text": "What colour\nis the shape?"}
    assert box.get_attribute("value") == "" and box.size["height"] <= one_line
    log = browser.find_element(By.ID, "log").text

    browser.refresh()
    _wait(browser, lambda b: b.find_element(By.ID, "log").text == log or None, seconds=30)
    assert _answers(browser) == first and browser.find_elements(By.CSS_SELECTOR, ".msg.user img.sent")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 0  # (nothing was drawn)
    browser.find_element(By.ID, "question").send_keys("And its shape?", Keys.ENTER)
    _wait(browser, lambda b: len(_answers(b)) == 2 or None)
    follow_up = sent[-1]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[0] == sent[-2][0] and follow_up[0]["content"][0]["type"] == "image_url"
    assert follow_up[1]["content"] == [{"type": "text", "text": first[0]}]
    browser.find_element(By.ID, "new-chat").click()
    browser.refresh()
    _wait(browser, lambda b: b.find_element(By.ID, "model").text == MODEL or None, seconds=30)
    assert browser.find_element(By.ID, "log").text == ""
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def _under_prefix(app, prefix):
    """`app` as a proxy's path prefix serves it (nginx `location /p/ { proxy_pass http://app/; }`):
    PREFIX/x reaches the app as /x; anything else is not found."""

    async def proxied(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == prefix:  # (as Traefik's StripPrefix passes it on)
            scope = dict(scope, path=prefix + "/")
        if scope["type"] == "http" and not scope["path"].startswith(prefix + "/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"outside the prefix"})
            return
        if scope["type"] == "http":
            path = scope["path"][len(prefix):]
            scope = dict(scope, path=path, raw_path=path.encode())
        await app(scope, receive, send)

    proxied.state = app.state  # (what the test server reads to stop the app's scheduler first)
    return proxied


def test_the_page_works_under_a_path_prefix_folds_big_seeds_as_the_server_does_and_a_new_chat_stops_a_drawing(
        monkeypatch):
    """Behind a proxy's path prefix the page called /v1/... outside it (404 for everything); a seed
    past 2**53 typed into the page was rounded to another before it was sent (and 2**64 - 1 was
    refused); "New chat" left a drawing going, and its picture landed in the new chat; a key no
    HTTP header can carry left the old status and an uncaught error."""
    import time

    from selenium.webdriver.common.by import By

    settings = ServeSettings(model_name=MODEL, api_key=KEY, default_size=(64, 64), sizes=((64, 64),))
    app = create_app(default.pipeline(), settings)
    server, browser = _Running(_under_prefix(app, "/unitoken")), _browser()
    seeds, parse = [], wire.parse_chat
    monkeypatch.setattr(wire, "parse_chat", lambda body, *a: (seeds.append(body.get("seed")), parse(body, *a))[1])
    try:
        browser.get(server.url + "/unitoken/")
        key = browser.find_element(By.ID, "key")
        key.send_keys("clé")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        _wait(browser, lambda b: "an HTTP header cannot carry" in b.find_element(By.ID, "status").text, 30)
        key.clear()
        key.send_keys(KEY)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        _wait(browser, lambda b: b.find_element(By.ID, "model").text == MODEL, 60)
        assert browser.find_element(By.ID, "status").text == ""

        for typed, folded in (("4294967303", 7), ("9007199254740993", 1), ("18446744073709551615", 2 ** 32 - 1),
                              ("1e3", 1000)):  # (as a number input takes it)
            seed = browser.find_element(By.ID, "seed")
            seed.clear()
            seed.send_keys(typed)
            browser.find_element(By.ID, "prompt").send_keys("a red circle at the top left")
            n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant img.drawn")) + 1
            browser.find_element(By.ID, "draw-button").click()
            _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant img.drawn")) == n
                  or b.find_elements(By.CSS_SELECTOR, ".msg.error"))
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), browser.find_element(By.ID, "log").text
            assert seeds[-1] == folded, (typed, seeds)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")

        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 1500,
                                                                     "downloadThroughput": -1, "uploadThroughput": -1})
        browser.find_element(By.ID, "prompt").send_keys("a blue square at the top right")
        browser.find_element(By.ID, "draw-button").click()
        browser.find_element(By.ID, "new-chat").click()
        time.sleep(6)  # the drawing would have come back by now
        assert browser.find_element(By.ID, "log").text == "" and not browser.find_elements(By.CSS_SELECTOR, ".msg")
        assert browser.find_element(By.ID, "draw-button").is_enabled()
        # opened without the prefix's slash, its relative URLs had left the prefix (404 for everything)
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                                     "downloadThroughput": -1, "uploadThroughput": -1})
        browser.get(server.url + "/unitoken")
        _wait(browser, lambda b: b.find_element(By.ID, "model").text == MODEL, 60)
        assert browser.find_element(By.ID, "status").text == ""
    finally:
        browser.quit()
        server.stop()


def test_a_stream_cut_before_its_end_is_an_error_not_an_answer():
    """A stream that ended without its finish_reason (a proxy's read timeout, a server gone) was
    shown as a finished answer ("a red"), kept in the conversation and sent back as the
    assistant's turn; a cut drawing left an empty bubble."""
    from selenium.webdriver.common.by import By

    settings = ServeSettings(model_name=MODEL, default_size=(64, 64), sizes=((64, 64),))
    app = create_app(default.pipeline(), settings)

    async def cutting(scope, receive, send):  # the answer's first words, then the connection ends
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a red"},
                                  "finish_reason": None}]}
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode()})
            return
        await app(scope, receive, send)

    cutting.state = app.state
    server, browser = _Running(cutting), _browser()
    try:
        browser.get(server.url + "/")
        _wait(browser, lambda b: b.find_element(By.ID, "model").text == MODEL, 60)
        _ask_page(browser, "What colour is the shape?")
        error = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.error"), 60)
        assert "stopped before its end" in error[0].text and _answers(browser) == []
        assert browser.execute_script("return turns.length") == 0  # nothing kept to send back
    finally:
        browser.quit()
        server.stop()
