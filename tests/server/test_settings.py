"""Settings: every flag is also an ONEGEN_* variable, flags win, bad values name the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import ServerSettings, build_parser, parse_settings

# Written out, not read from ServerSettings: a field that loses its flag (or a flag that is dropped) must fail here.
EXPECTED_FLAGS = (
    # the engine's (EngineConfig)
    "dtype", "device", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "kv_cache_memory_gb",
    "enable_prefix_caching", "index_mmap",
    "gpu_memory_utilization", "max_model_len", "retriever", "retrieval_mode", "attention_backend", "linear_backend",
    "seed", "cuda_graphs",
    # the server's
    "checkpoint", "index", "index_poll_s", "served_model_name", "host", "port", "api_key", "metrics_auth", "public_docs",
    "header_timeout_s", "keep_alive_timeout_s", "max_header_bytes", "max_body_bytes", "max_pending_requests",
    "retry_after_s", "max_tokens_limit", "default_max_tokens", "max_retrieve_batch", "max_retrieve_k",
    "max_prompts_per_request", "drain_timeout_s", "stall_timeout_s", "log_level", "log_format", "log_prompts",
)


def test_every_field_has_a_flag_with_help_naming_its_variable():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    text = parser.format_help()
    for name in EXPECTED_FLAGS:
        assert "--" + name.replace("_", "-") in flags, name
        assert "ONEGEN_" + name.upper() in text, name
    assert sorted(ServerSettings.model_fields) == sorted(EXPECTED_FLAGS), "a new setting: add its flag above"


def test_environment_then_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("ONEGEN_CHECKPOINT", str(tmp_path))
    monkeypatch.setenv("ONEGEN_PORT", "9001")
    monkeypatch.setenv("ONEGEN_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("ONEGEN_LOG_PROMPTS", "true")
    monkeypatch.setenv("ONEGEN_API_KEY", "s3cret")
    s = parse_settings([])
    assert (s.checkpoint, s.port, s.max_num_seqs, s.log_prompts) == (tmp_path, 9001, 7, True)
    assert s.api_key_value() == "s3cret" and "s3cret" not in repr(s)
    s = parse_settings(["--port", "9002", "--no-log-prompts", "--dtype", "bfloat16"])
    assert (s.port, s.log_prompts, s.dtype, s.max_num_seqs) == (9002, False, "bfloat16", 7)


def test_bad_values_name_the_flag(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ONEGEN_CHECKPOINT", raising=False)
    assert parse_settings([]).checkpoint is None  # no --checkpoint: the embedded default model, not an error
    with pytest.raises(SystemExit):
        parse_settings(["--checkpoint", str(tmp_path), "--port", "http"])
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--checkpoint", str(tmp_path), "--device", "tpu"])
    assert "--device" in capsys.readouterr().err


def test_default_max_tokens_never_exceeds_the_limit(tmp_path):
    s = ServerSettings(checkpoint=tmp_path, max_tokens_limit=8)
    assert s.default_max_tokens == 8


def test_help_states_each_default_once():
    """A field whose description says its default ("(default: the engine's)") gets no second, generated one,
    and an unset (None) default is not printed as "(default: None)"."""
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in " ".join(text.split())
    for action in parser._actions:
        if action.help and action.dest != "help":
            assert action.help.count("(default") <= 1, action.help
    engine_default = next(a.help for a in parser._actions if a.dest == "max_num_seqs")
    assert engine_default.count("(default") == 1 and "(default: 64)" in engine_default  # EngineConfig's
    budget = next(a.help for a in parser._actions if a.dest == "max_num_batched_tokens")
    assert budget.count("(default") == 1 and "(default: 2048 on a GPU, 512 on the CPU)" in budget
    assert "(default: 16384)" in next(a.help for a in parser._actions if a.dest == "max_header_bytes")


def test_connection_limit_flags(tmp_path):
    """--header-timeout-s / --keep-alive-timeout-s / --max-header-bytes: flags and ONEGEN_* like every field."""
    s = parse_settings(["--checkpoint", str(tmp_path), "--header-timeout-s", "2.5", "--keep-alive-timeout-s", "3",
                        "--max-header-bytes", "8192", "--public-docs"])
    assert (s.header_timeout_s, s.keep_alive_timeout_s, s.max_header_bytes, s.public_docs) == (2.5, 3, 8192, True)


def test_engine_settings_are_declared_once_by_engine_config():
    """Every EngineConfig field is a server flag with the same default and bounds, and comes back as an
    EngineConfig unchanged: nothing is copied by hand."""
    import dataclasses

    from onegen_core.engine.engine_config import EngineConfig
    from server.settings import build_parser, parse_settings

    flags = {a.dest for a in build_parser()._actions}
    for f in dataclasses.fields(EngineConfig):
        assert f.name in flags
    given = ["--checkpoint", "ck", "--max-num-batched-tokens", "96", "--seed", "7", "--kv-cache-memory-gb", "0.5",
             "--linear-backend", "aten", "--cuda-graphs"]
    cfg = parse_settings(given).engine_config()
    assert cfg == EngineConfig(max_num_batched_tokens=96, seed=7, kv_cache_memory_gb=0.5, linear_backend="aten",
                               cuda_graphs=True)
    assert parse_settings(["--checkpoint", "ck"]).engine_config() == EngineConfig()
    with pytest.raises(SystemExit):  # the engine's own bound, enforced by the flag
        parse_settings(["--checkpoint", "ck", "--gpu-memory-utilization", "1.5"])


def test_index_names_and_paths(monkeypatch, tmp_path, capsys):
    """--index PATH is the index named 'default', --index NAME=PATH one named NAME, repeatable; the variable takes
    one value or a JSON list; a name given twice or a bad name fails naming --index."""
    s = parse_settings(["--checkpoint", str(tmp_path), "--index", "/data/main", "--index", "news=/data/n=1"])
    assert s.index == {"default": Path("/data/main"), "news": Path("/data/n=1")}
    assert parse_settings(["--checkpoint", str(tmp_path), "--index", "/data/a=b"]).index == {"default": Path("/data/a=b")}
    assert ServerSettings(checkpoint=tmp_path, index=tmp_path).index == {"default": tmp_path}  # the Python API
    monkeypatch.setenv("ONEGEN_INDEX", str(tmp_path))
    assert parse_settings([]).index == {"default": tmp_path}
    monkeypatch.setenv("ONEGEN_INDEX", '["wiki=/w", "news=/n"]')
    assert list(parse_settings([]).index) == ["wiki", "news"]
    assert parse_settings(["--index", "only=/o"]).index == {"only": Path("/o")}  # a flag replaces the variable
    for bad, says in ((["--index", "/a", "--index", "/b"], "'default' is given twice"),
                      (["--index", "wiki="], "no directory after 'wiki='")):
        with pytest.raises(SystemExit):
            parse_settings(["--checkpoint", str(tmp_path), *bad])
        err = capsys.readouterr().err
        assert "--index" in err and says in err, err
    monkeypatch.setenv("ONEGEN_INDEX", '["wiki=/w",')
    with pytest.raises(SystemExit):
        parse_settings([])
    assert "not a JSON list" in capsys.readouterr().err
    monkeypatch.delenv("ONEGEN_INDEX")
    assert parse_settings(["--index-poll-s", "0"]).index_poll_s == 0
