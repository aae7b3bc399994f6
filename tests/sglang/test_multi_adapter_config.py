"""Several adapters on one SGLang server (``adapters:``) without a server: the launch command of
a two-adapter run, the plugin's checks keyed by adapter, the declaration."""

from __future__ import annotations

import pytest

from areal_core.config import ActorConfig, AdapterConfig, RolloutConfig, RunConfig
from areal_core.errors import AdapterLoadError, ArealError
from areal_core.interfaces import ExportedAdapter
from areal_sglang import plugin
from areal_sglang.config_checks import validate
from areal_sglang.launcher import server_command
from areal_sglang.server import SGLangRolloutServer, launch_spec
from areal_sglang.target_modules import union_target_modules


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def targets(command: list[str]) -> list[str]:
    return command[command.index("--lora-target-modules") + 1:command.index("--max-loaded-loras")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Only config.json is read to derive the flags."""
    directory = tmp_path_factory.mktemp("config-only")
    (directory / "config.json").write_text(
        '{"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "num_hidden_layers": 2}'
    )
    return directory


def two_adapters(model_dir, **rollout) -> RunConfig:
    return RunConfig(
        actor=ActorConfig(path=str(model_dir), lora_rank=4, device="cpu"),
        # the entries' own windows apply, not this one
        rollout=RolloutConfig(backend="sglang", max_head_offpolicyness=5, **rollout),
        adapters=[
            AdapterConfig(name="add", lora_rank=4, target_modules=["q_proj", "v_proj"], max_head_offpolicyness=1),
            AdapterConfig(name="sub", lora_rank=12, target_modules=["o_proj", "down_proj", "v_proj"],
                          max_head_offpolicyness=0),
        ],
    )


def test_the_launch_command_of_a_two_adapter_run_holds_both(model_dir):
    command = server_command(launch_spec(two_adapters(model_dir), port=1), "python")
    assert flag(command, "--max-lora-rank") == "12"  # the largest rank (SGLang takes any rank)
    # add: current, one behind, one loading (3); sub: current, one loading (2)
    assert flag(command, "--max-loaded-loras") == flag(command, "--max-loras-per-batch") == "5"
    assert targets(command) == ["down_proj", "o_proj", "q_proj", "v_proj"]  # the union, each once
    # rollout.max_loras, when larger, raises both
    raised = server_command(launch_spec(two_adapters(model_dir, max_loras=9), port=1), "python")
    assert flag(raised, "--max-loaded-loras") == flag(raised, "--max-loras-per-batch") == "9"


def test_one_adapter_on_all_linear_makes_the_union_all(model_dir):
    config = two_adapters(model_dir)
    config.adapters[1].target_modules.clear()  # [] means [all-linear]
    assert targets(server_command(launch_spec(config, port=1), "python")) == ["all"]
    assert union_target_modules([["q_proj"], ["all-linear"]]) == ["all-linear"]
    assert union_target_modules([["v_proj", "q_proj"], ["q_proj"]]) == ["q_proj", "v_proj"]


def test_a_run_without_adapters_launches_as_before(model_dir):
    single = RunConfig(actor=ActorConfig(path=str(model_dir), lora_rank=16, device="cpu",
                                         target_modules=["q_proj", "v_proj"]),
                       rollout=RolloutConfig(backend="sglang", max_head_offpolicyness=3))
    command = server_command(launch_spec(single, port=1), "python")
    assert (flag(command, "--max-lora-rank"), flag(command, "--max-loaded-loras")) == ("16", "5")
    assert targets(command) == ["q_proj", "v_proj"]


def test_checks_name_the_adapter_whose_modules_sglang_cannot_serve(model_dir):
    config = two_adapters(model_dir, servers=["127.0.0.1:1"],
                          extra_args=["--max-lora-rank", "8", "--max-loaded-loras", "4"])
    config.adapters[0].target_modules[:] = ["q_.*"]
    config.adapters[1].target_modules[:] = ["all-linear", "o_proj"]
    errors = validate(config)
    assert sorted(error.key for error in errors) == [
        "adapters.add.target_modules", "adapters.sub.target_modules", "rollout.extra_args", "rollout.extra_args"]
    text = "\n".join(map(str, errors))
    assert "not regular expressions" in text and "cannot be combined" in text
    assert "adapters.sub.lora_rank is 12, the largest rank" in text
    assert "must be at least 5 (the adapters keep up to 5 versions live at once" in text
    fine = two_adapters(model_dir, servers=["127.0.0.1:1"])
    assert validate(fine) == []


def test_the_declaration_serves_several_adapters():
    (declaration,) = plugin.areal_declare_backends()
    assert declaration.lora.multi_adapter is True


def test_names_of_no_adapter_of_the_run_are_refused_before_any_request(model_dir):
    server = SGLangRolloutServer(two_adapters(model_dir, servers=["127.0.0.1:1"]))
    assert list(server.adapter_versions) == ["add", "sub"]
    assert (server.adapter_versions["add"].window, server.adapter_versions["sub"].window) == (1, 0)
    server.clients = [object()]  # "started": every refusal below comes before any request
    for name in ("mul-v0", "add", "addv1", "sub-v1x", "add-v1-v2"):
        with pytest.raises(ArealError, match=r"for none of the run's adapters \(add, sub\)"):
            server.generate([[1, 2]], lora_name=name, version=0, n=1, sampling=None)
        with pytest.raises(ArealError, match=r"for none of the run's adapters \(add, sub\)"):
            server.prompt_logprobs([1, 2], lora_name=name)
        with pytest.raises(ArealError, match=r"for none of the run's adapters \(add, sub\)"):
            server.unload_adapter(name)
    exported = ExportedAdapter(path="/nonexistent", version=7, rank=4, alpha=8, target_modules=("q_proj",))
    with pytest.raises(AdapterLoadError, match=r"'mul-v7'.*none of the run's adapters \(add, sub\).*version 7 "
                                               r"of add must be loaded as 'add-v7'; version 7 of sub must be "
                                               r"loaded as 'sub-v7'"):
        server.load_adapter(exported, "mul-v7")
    with pytest.raises(AdapterLoadError, match=r"must be loaded as 'sub-v7', not 'sub-v8' \(names are "
                                               r"<adapter>-v<version>\)"):
        server.load_adapter(exported, "sub-v8")
