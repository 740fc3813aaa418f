"""Server fixtures: the demo checkpoint + index, and one real uvicorn process shared by the session."""

from __future__ import annotations

import pytest
from server_harness import API_KEY, HEADER_TIMEOUT_S, MAX_RETRIEVE_BATCH, MAX_TOKENS_LIMIT, ServerProcess


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(checkpoint dir, index dir): the built-in demo (random tiny Llama that retrieves) — the same
    function ``scripts/serve.sh`` runs on a fresh machine."""
    from server.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def live_server(demo_assets, tmp_path_factory):
    ckpt, index = demo_assets
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(
        ["--checkpoint", str(ckpt), "--index", str(index), "--max-num-seqs", "32",
         "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--default-max-tokens", "16",
         "--max-retrieve-batch", str(MAX_RETRIEVE_BATCH), "--max-body-bytes", "65536",
         "--header-timeout-s", str(HEADER_TIMEOUT_S)],
        log, api_key=API_KEY,
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(live_server):
    with live_server.client() as c:
        yield c
