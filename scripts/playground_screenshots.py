"""Screenshots of the playground after a retrieval, at desktop (1280 px) and phone (390 px) width.

    HF_HUB_OFFLINE=1 python scripts/playground_screenshots.py            # serves the default model itself
    python scripts/playground_screenshots.py --url http://127.0.0.1:8011  # or uses a server already running

Without ``--url`` it starts ``python -m server`` on the trained default model (``.cache/onegen-default``,
prepared by ``bash scripts/serve.sh`` or ``python -m server.prepare_default``) in bfloat16 on a free
loopback port, in the retrieval mode the README's serve command uses for it (hybrid), and stops it afterwards. It asks the question in chat mode, waits for the answer, opens
the first retrieval marker and writes ``docs/images/playground-desktop.png`` and ``playground-phone.png``
(the whole page). It needs Chromium and chromedriver (``apt-get install chromium chromium-driver``)
and the ``dev`` extra (selenium). Exits non-zero, saying why, when the model did not retrieve.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "server"))  # the test suite's server process and browser helpers

from playground_browser import full_page_png, missing_browser, set_viewport, start_chromium  # noqa: E402
from server_harness import ServerProcess  # noqa: E402

from server.prepare_default import DEFAULT_MODEL_RETRIEVAL_MODE  # noqa: E402

DEFAULT_ROOT = REPO / ".cache" / "onegen-default"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/playground_screenshots.py", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start one on the default model)")
    p.add_argument("--api-key", help="the running server's API key, if it has one")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_ROOT / "checkpoint", help="(default: %(default)s)")
    p.add_argument("--index", type=Path, default=DEFAULT_ROOT / "index", help="(default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", help="(default: %(default)s)")
    p.add_argument("--retrieval-mode", default=DEFAULT_MODEL_RETRIEVAL_MODE,
                   help="how the server it starts retrieves (default: %(default)s, as the default model is served)")
    p.add_argument("--served-model-name", default="onegen-smollm2-wiki", help="(default: %(default)s)")
    p.add_argument("--question", default="Tell me about the climate of Alaska.", help="(default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="(default: docs/images)")
    return p.parse_args(argv)


def capture(url: str, api_key: str | None, question: str, max_tokens: int, out: Path) -> list[Path]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chrome = start_chromium(1280, 900)
    try:
        chrome.get(url + "/playground")
        if api_key:
            chrome.execute_script("sessionStorage.setItem('onegen.playground.apiKey', arguments[0])", api_key)
            chrome.get(url + "/playground")
        WebDriverWait(chrome, 30).until(lambda d: "index:" in d.find_element(By.ID, "server-info").text)
        field = chrome.find_element(By.ID, "max-tokens")
        field.clear()
        field.send_keys(str(max_tokens))
        chrome.find_element(By.ID, "mode-chat").click()
        field = chrome.find_element(By.ID, "question")
        field.clear()
        field.send_keys(question, Keys.ENTER)
        WebDriverWait(chrome, 300).until(
            lambda d: d.find_element(By.ID, "generate-status").text.startswith(("Done", "Stopped", "Incomplete"))
            or d.find_element(By.ID, "generate-error").text)
        error = chrome.find_element(By.ID, "generate-error").text
        if error:
            raise SystemExit(f"the page shows an error: {error}")
        markers = chrome.find_elements(By.CSS_SELECTOR, "#output .marker")
        if not markers:
            raise SystemExit(f"the model did not retrieve on {question!r}; answer: "
                             f"{chrome.find_element(By.ID, 'output').text!r}")
        markers[0].click()
        chrome.execute_script("document.activeElement.blur()")  # no focus ring in the picture
        time.sleep(0.3)  # the caret's last frame and layout settle
        desktop = full_page_png(chrome, out / "playground-desktop.png")
        set_viewport(chrome, 390, 844, mobile=True)
        time.sleep(0.3)
        phone = full_page_png(chrome, out / "playground-phone.png")
        return [desktop, phone]
    finally:
        chrome.quit()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = missing_browser()
    if problem is not None:
        print(f"playground_screenshots: {problem}", file=sys.stderr)
        return 2
    if args.url:
        paths = capture(args.url.rstrip("/"), args.api_key, args.question, args.max_tokens, args.out)
    else:
        for flag, path in (("--checkpoint", args.checkpoint), ("--index", args.index)):
            if not path.is_dir():
                print(f"playground_screenshots: {flag} {path} does not exist: prepare the default model first "
                      "(bash scripts/serve.sh, or python -m server.prepare_default)", file=sys.stderr)
                return 2
        with tempfile.TemporaryDirectory() as tmp:
            server = ServerProcess(["--checkpoint", str(args.checkpoint), "--index", str(args.index),
                                    "--dtype", args.dtype, "--retrieval-mode", args.retrieval_mode,
                                    "--served-model-name", args.served_model_name],
                                   Path(tmp) / "server.log")
            try:
                server.wait_ready(timeout=300)
                paths = capture(server.url, None, args.question, args.max_tokens, args.out)
            finally:
                server.stop()
    for p in paths:
        print(p.relative_to(REPO) if p.is_relative_to(REPO) else p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
