"""The playground page (``GET /playground``): its files without the key, and the page itself in a real browser.

The browser test drives Debian's headless Chromium through Selenium against the session's demo
server on loopback (started with an API key): the page loads without console errors, asks for the
key, streams an answer whose text and retrieval markers match the server's non-streamed answer,
opens a marker's passage, answers with no marker when retrieval is off, names the field of a 422,
says a wrong key is wrong, and fits a phone's width. It is skipped only where no Chromium is installed.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from playground_browser import console_errors, missing_browser, set_viewport, start_chromium
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from server_harness import API_KEY, RETRIEVING_PROMPT

from server import playground
from server.app import create_app
from server.demo import DEMO_CORPUS
from server.errors import error_payload
from server.settings import ServerSettings

ASSETS = {"/playground": "text/html", "/playground/playground.js": "text/javascript",
          "/playground/playground.css": "text/css"}


# ---------------------------------------------------------------------------- the files, over HTTP
def test_page_files_load_without_the_key_and_the_api_still_needs_it(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as anonymous:
        root = anonymous.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/playground"
        for path, media_type in ASSETS.items():
            r = anonymous.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["content-type"].startswith(media_type), path
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            # nothing from elsewhere: no URL with a scheme or a protocol-relative host in the page's files
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", r.text, re.I), path
            head = anonymous.head(path)
            assert head.status_code == 200 and head.content == b""
        assert playground.AUTH_META_REQUIRED in anonymous.get("/playground").text
        # only those paths are open: the API and anything else under /playground still want the key
        for method, path in (("GET", "/info"), ("POST", "/generate"), ("POST", "/retrieve"),
                             ("GET", "/playground/index.html"), ("GET", "/playground/../info"),
                             ("GET", "/playground/"), ("GET", "/playground.js")):
            assert anonymous.request(method, path, json={}).status_code == 401, (method, path)


def test_page_says_when_no_key_is_needed(tmp_path):
    app = create_app(ServerSettings(checkpoint=tmp_path), engine_factory=lambda: None)

    async def fetch() -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as ac:
            r = await ac.get("/playground")
            assert r.status_code == 200
            return r.text

    html = asyncio.run(fetch())
    assert playground.AUTH_META_OPTIONAL in html and playground.AUTH_META_REQUIRED not in html


# ---------------------------------------------------------------------------- the page, in Chromium
@pytest.fixture(scope="module")
def browser():
    reason = missing_browser()
    if reason is not None:
        pytest.skip(f"no browser for the playground's end-to-end test: {reason}")
    chrome = start_chromium(1280, 900)
    try:
        yield chrome
    finally:
        chrome.quit()


def _wait(chrome, condition, what: str, timeout: float = 30.0):
    try:
        return WebDriverWait(chrome, timeout, poll_frequency=0.05).until(lambda d: condition())
    except TimeoutException:
        page = chrome.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; the page says:\n{page}") from None


def _text(chrome, element_id: str) -> str:
    return chrome.find_element(By.ID, element_id).text


def _set(chrome, element_id: str, value: str) -> None:
    field = chrome.find_element(By.ID, element_id)
    field.clear()
    if value:
        field.send_keys(value)


# The answer as the page shows it: its text without the markers, and the code-point offset of each marker.
ANSWER_JS = """
const out = document.getElementById('output');
let text = ''; const markers = [];
for (const n of out.childNodes) {
  if (n.nodeType === Node.TEXT_NODE) text += n.data;
  else if (n.classList.contains('marker')) markers.push([...text].length);
  else if (n.classList.contains('linked')) text += n.textContent;
}
return [text, markers];
"""


def _unexpected(errors: list[dict], status: int) -> list[dict]:
    """Console errors other than Chromium's own line for a response with ``status`` (it logs every 4xx)."""
    return [e for e in errors if not (e.get("source") == "network" and f"status of {status}" in e["message"])]


def _generate(chrome, submit) -> None:
    submit()
    _wait(chrome, lambda: re.match(r"Done|Stopped|Incomplete|Ended", _text(chrome, "generate-status"))
          or not chrome.find_element(By.ID, "generate-error").get_attribute("hidden"), "the answer to finish")
    error = _text(chrome, "generate-error")
    assert _text(chrome, "generate-status").startswith("Done"), f"status {_text(chrome, 'generate-status')!r}: {error}"


def test_playground_in_a_browser(live_server, client, browser):
    chrome = browser
    chrome.get(live_server.url + "/")
    assert chrome.current_url == live_server.url + "/playground"
    # a keyed server: the page asks for the key before calling anything, and says so
    _wait(chrome, lambda: "needs an API key" in _text(chrome, "key-status"), "the page to ask for the key")
    assert chrome.switch_to.active_element == chrome.find_element(By.ID, "api-key")
    assert console_errors(chrome) == []

    chrome.switch_to.active_element.send_keys(API_KEY + Keys.ENTER)  # Enter submits the key form
    _wait(chrome, lambda: "index: 16 passages" in _text(chrome, "server-info"), "/info with the key")
    assert "DEMO" in _text(chrome, "server-info")

    # one question, streamed: the page's answer and markers are the server's answer and retrievals
    body = {"prompt": RETRIEVING_PROMPT, "max_tokens": 24, "temperature": 0, "top_p": 1,
            "retrieval": {"enabled": True, "return_passages": True}}
    expected = client.post("/generate", json=body).json()
    assert expected["retrievals"], "the demo model retrieves on this prompt"
    chrome.find_element(By.ID, "mode-prompt").click()
    _set(chrome, "max-tokens", "24")
    _set(chrome, "question", RETRIEVING_PROMPT)
    _generate(chrome, lambda: chrome.find_element(By.ID, "question").send_keys(Keys.ENTER))  # Enter sends
    text, marker_offsets = chrome.execute_script(ANSWER_JS)
    assert text == expected["text"] and text.strip()
    assert marker_offsets == [r["output_text_offset"] for r in expected["retrievals"]]
    u = expected["usage"]
    assert _text(chrome, "n-prompt") == str(u["prompt_tokens"])
    assert _text(chrome, "n-generated") == str(u["completion_tokens"])
    assert _text(chrome, "n-inserted") == str(u["retrieved_tokens"]) != "0"
    assert _text(chrome, "n-ttft") != "–" and _text(chrome, "n-rate") != "–"
    listed = chrome.find_elements(By.CSS_SELECTOR, "#n-retrievals li")
    assert len(listed) == len(expected["retrievals"]) and all("search" in li.text and "ms" in li.text for li in listed)

    # opening the first marker shows its passage: title, doc id, score and the corpus text
    first = expected["retrievals"][0]["hits"][0]
    doc = next(d for d in DEMO_CORPUS if d.id == first["doc_id"])
    marker = chrome.find_elements(By.CSS_SELECTOR, "#output .marker")[0]
    marker.click()
    view = chrome.find_element(By.ID, "passage-view")
    assert view.is_displayed() and marker.get_attribute("aria-expanded") == "true"
    assert chrome.switch_to.active_element == chrome.find_element(By.ID, "passage-heading")
    assert doc.title in view.text and f"doc {doc.id}" in view.text and doc.text in view.text
    assert f"score {first['score']:.3f}" in view.text
    chrome.switch_to.active_element.send_keys(Keys.ESCAPE)  # Escape closes it and gives the marker back the focus
    assert not view.is_displayed() and chrome.switch_to.active_element == marker
    assert console_errors(chrome) == []

    # retrieval off: an answer, and no marker
    off = client.post("/generate", json={**body, "retrieval": {"enabled": False, "return_passages": True}}).json()
    chrome.find_element(By.ID, "retrieval-enabled").click()
    _generate(chrome, lambda: chrome.find_element(By.ID, "generate-button").click())
    text, marker_offsets = chrome.execute_script(ANSWER_JS)
    assert text == off["text"] and text.strip() and marker_offsets == []
    assert chrome.find_elements(By.CSS_SELECTOR, "#output .marker") == []
    assert _text(chrome, "n-inserted") == "0"
    assert _text(chrome, "n-retrievals") == "none: the model answered without retrieving"
    assert _text(chrome, "generate-status").endswith("tokens, answered without retrieval.")

    # a 422 is shown in words, naming the field, which is marked and focused
    _set(chrome, "stop", "\n".join(f"s{i}" for i in range(17)))
    chrome.find_element(By.ID, "generate-button").click()
    _wait(chrome, lambda: _text(chrome, "generate-error"), "the 422 message")
    assert 'refused the setting "stop"' in _text(chrome, "generate-error")
    stop = chrome.find_element(By.ID, "stop")
    assert stop.get_attribute("aria-invalid") == "true" and chrome.switch_to.active_element == stop
    _set(chrome, "stop", "")
    assert _unexpected(console_errors(chrome), 422) == []

    # search only, by keyboard: arrow keys move between the tabs, Enter searches
    chrome.find_element(By.ID, "tab-generate").send_keys(Keys.ARROW_RIGHT)
    assert chrome.switch_to.active_element == chrome.find_element(By.ID, "tab-search")
    assert chrome.find_element(By.ID, "panel-search").is_displayed()
    assert not chrome.find_element(By.ID, "panel-generate").is_displayed()
    _set(chrome, "search-k", "3")
    _set(chrome, "search-query", "who bakes bread?")
    chrome.find_element(By.ID, "search-query").send_keys(Keys.ENTER)
    _wait(chrome, lambda: "passages" in _text(chrome, "search-status"), "the search results")
    found = client.post("/retrieve", json={"queries": "who bakes bread?", "k": 3, "return_text": True}).json()
    hits = found["results"][0]["hits"]
    shown = chrome.find_elements(By.CSS_SELECTOR, "#search-results .hit")
    assert [h.find_element(By.CSS_SELECTOR, ".hit-title").text for h in shown] == \
        [f"{i + 1}. {h['title']}" for i, h in enumerate(hits)]
    assert all(h["text"] in li.text and f"doc {h['doc_id']}" in li.text for h, li in zip(hits, shown, strict=True))
    chrome.find_element(By.ID, "tab-search").send_keys(Keys.HOME)
    assert chrome.find_element(By.ID, "panel-generate").is_displayed()
    assert console_errors(chrome) == []

    # at a phone's width nothing is wider than the screen
    set_viewport(chrome, 390, 844, mobile=True)
    assert chrome.execute_script("return document.documentElement.scrollWidth") <= 390
    set_viewport(chrome, 1280, 900)

    # a wrong key: the page says so in words (and does not go blank)
    _set(chrome, "api-key", "wrong-key")
    chrome.find_element(By.ID, "api-key").send_keys(Keys.ENTER)
    _wait(chrome, lambda: "refused the API key" in _text(chrome, "server-info"), "/info refusing the key")
    chrome.find_element(By.ID, "generate-button").click()
    _wait(chrome, lambda: "refused the API key (invalid API key)" in _text(chrome, "generate-error"), "the 401 message")
    assert chrome.switch_to.active_element == chrome.find_element(By.ID, "api-key")
    assert _unexpected(console_errors(chrome), 401) == []


# Responses the page cannot easily get from a healthy demo server (a busy server, a prompt longer than the
# context, a stream cut off, an annotate model), in the server's exact shapes: fetch('generate') is swapped
# for one that answers them, everything else on the page runs as is.
FAKE_GENERATE_JS = """
const [status, payload, headers, drop] = arguments;
window.__realFetch = window.__realFetch || window.fetch;
window.fetch = async (url, init) => {
  if (String(url) !== 'generate') return window.__realFetch(url, init);
  if (status !== 200) {
    return new Response(JSON.stringify(payload), {status, headers: {'Content-Type': 'application/json', ...headers}});
  }
  const enc = new TextEncoder();
  const body = new ReadableStream({start(c) {
    for (const data of payload) c.enqueue(enc.encode('data: ' + data + '\\n\\n'));
    if (drop) setTimeout(() => c.error(new TypeError('network error')), 50); else c.close();
  }});
  return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
};
"""


def _sse(*events: dict | str) -> list[str]:
    return [e if isinstance(e, str) else json.dumps(e) for e in events]


def _retrieval(action: str, offset: int, token_index: int, doc_id: str, title: str, text: str) -> dict:
    hit = {"doc_id": doc_id, "score": 0.5, "title": title, "text": text, "metadata": None}
    return {"type": "retrieval", "query_token": "[LK]" if action == "annotate" else "[RQ]", "action": action,
            "output_token_index": token_index, "output_text_offset": offset, "hits": [hit],
            "inserted_tokens": 0 if action == "annotate" else 12, "search_ms": 1.25}


def test_playground_explains_what_went_wrong(live_server, browser):
    chrome = browser
    chrome.get(live_server.url + "/playground")
    chrome.execute_script("sessionStorage.setItem('onegen.playground.apiKey', arguments[0])", API_KEY)
    chrome.get(live_server.url + "/playground")
    _wait(chrome, lambda: "index: 16 passages" in _text(chrome, "server-info"), "/info with the key")
    button = chrome.find_element(By.ID, "generate-button")

    def answer_with(status: int, payload, headers: dict | None = None, drop: bool = False) -> str:
        chrome.execute_script(FAKE_GENERATE_JS, status, payload, headers or {}, drop)
        button.click()
        _wait(chrome, lambda: button.is_enabled() and _text(chrome, "generate-status") not in ("Sending…",),
              "the request to end")
        return _text(chrome, "generate-error")

    busy = answer_with(429, error_payload(429, "too many pending requests", "overloaded"), {"Retry-After": "7"})
    assert busy == "The server is busy: too many requests are already waiting. Try again in 7 s."

    long = answer_with(422, error_payload(422, "messages: the prompt has 9000 tokens, more than the model's "
                                               "maximum of 8192", "context_length_exceeded", "messages"))
    assert long.startswith("The question is too long for the model: messages: the prompt has 9000 tokens")
    assert chrome.find_element(By.ID, "question").get_attribute("aria-invalid") == "true"

    # a stream that breaks off: what arrived stays, with its marker, and the page says the connection dropped
    events = _sse({"type": "token", "text": "Partial ", "token_ids": [1, 2]},
                  _retrieval("insert", 8, 2, "d1", "Doc one", "<b>not markup</b>"),
                  {"type": "token", "text": "answer", "token_ids": [3]})
    dropped = answer_with(200, events, drop=True)
    assert dropped.startswith("The connection dropped before the answer was finished")
    assert chrome.execute_script(ANSWER_JS) == ["Partial answer", [8]]
    chrome.find_element(By.CSS_SELECTOR, "#output .marker").click()
    assert "<b>not markup</b>" in _text(chrome, "passage-hits")  # passage text is text, never HTML
    assert chrome.find_elements(By.CSS_SELECTOR, "#passage-hits b") == []

    # the server ending a stream with an error event (a drain timeout)
    events = _sse({"type": "token", "text": "Half", "token_ids": [1]},
                  {"type": "error", **error_payload(500, "the server is shutting down", "server_shutdown")},
                  "[DONE]")
    assert answer_with(200, events).startswith("The server ended this answer early because it is shutting down")

    # an annotate retrieval (entity linking) underlines the mention before its marker
    text = "I visited New York last year."
    final = {"type": "final", "id": "gen-1", "model": "m", "text": text, "finish_reason": "stop",
             "usage": {"prompt_tokens": 5, "completion_tokens": 8, "retrieved_tokens": 0, "total_tokens": 13},
             "retrievals": [], "logprobs": None, "timings": {"time_to_first_token_s": 0.01, "e2e_s": 0.1}}
    linked = _retrieval("annotate", 18, 4, "e7", "New York City", "New York City is a city.")
    final["retrievals"] = [{k: v for k, v in linked.items() if k != "type"}]
    events = _sse({"type": "token", "text": "I visited New York", "token_ids": [1, 2, 3, 4]}, linked,
                  {"type": "token", "text": " last year.", "token_ids": [5, 6, 7, 8]}, final, "[DONE]")
    assert answer_with(200, events) == ""
    assert chrome.execute_script(ANSWER_JS) == [text, [18]]
    [span] = chrome.find_elements(By.CSS_SELECTOR, "#output .linked")
    assert span.text == "New York" and "annotate" in chrome.find_element(By.CSS_SELECTOR, "#output .marker").get_attribute("class")
    assert _text(chrome, "generate-status") == "Done (stop): 8 tokens, 1 retrieval."
    chrome.execute_script("window.fetch = window.__realFetch")
