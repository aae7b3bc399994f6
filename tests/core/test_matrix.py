"""The support matrix is derived from declarations, and says why a cell is unsupported."""

from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
from areal_core.matrix import build_matrix

READY = LoraSupport(status=LoraStatus.READY)


def decl(name, kind, **lora):
    return BackendDeclaration(name=name, kind=kind, lora=LoraSupport(**{"status": LoraStatus.READY, **lora}))


def test_ready_pair_with_shared_transport_is_supported():
    m = build_matrix([decl("e", "engine"), decl("s", "server")])
    assert m.supports("e", "s") and m.reason("e", "s") == ""
    assert m.to_dict()["cells"] == [{"engine": "e", "server": "s", "supported": True, "reason": "",
                                     "multi_adapter": False, "multi_adapter_reason": m.cell("e", "s").multi_adapter_reason}]


def test_not_implemented_never_reads_supported():
    m = build_matrix([decl("e", "engine", status=LoraStatus.NOT_IMPLEMENTED), decl("s", "server")])
    assert not m.supports("e", "s")
    assert "not implemented yet" in m.reason("e", "s")


def test_engine_without_lora_is_refused_with_its_reason():
    m = build_matrix([decl("archon", "engine", status=LoraStatus.UNSUPPORTED, reason="no adapter code"),
                      decl("s", "server")])
    assert m.reason("archon", "s") == "engine archon has no LoRA support: no adapter code"


def test_transport_mismatch_is_explained():
    m = build_matrix([decl("e", "engine", transports=("nccl-tensors",)), decl("s", "server")])
    assert not m.supports("e", "s")
    assert "nccl-tensors" in m.reason("e", "s") and "peft-directory" in m.reason("e", "s")


def test_peft_type_mismatch_is_explained():
    m = build_matrix([decl("e", "engine", peft_types=("dora",)), decl("s", "server")])
    assert "dora" in m.reason("e", "s")


def test_unknown_backend_names_the_installed_ones():
    m = build_matrix([decl("e", "engine"), decl("s", "server")])
    reason = m.reason("nope", "s")
    assert "engine 'nope' is not installed" in reason and "e" in reason


def test_markdown_rows_are_engines_and_columns_servers():
    m = build_matrix([decl("e1", "engine", multi_adapter=True),
                      decl("e2", "engine", status=LoraStatus.NOT_IMPLEMENTED),
                      decl("s1", "server", multi_adapter=True), decl("s2", "server", multi_adapter=True)])
    lines = m.to_markdown().splitlines()
    assert lines[0] == "| Engine | s1 | s2 |"
    assert lines[2] == "| e1 | yes (multi) | yes (multi) |"
    assert lines[3].startswith("| e2 | no [1] | no [2] |")
    assert any(line.startswith("[1] engine e2: LoRA not implemented yet") for line in lines)


def test_a_pair_trains_several_adapters_only_when_both_sides_declare_it():
    m = build_matrix([decl("e", "engine", multi_adapter=True), decl("one", "engine"),
                      decl("s", "server", multi_adapter=True), decl("t", "server")])
    assert m.cell("e", "s").multi_adapter and m.cell("e", "s").multi_adapter_reason == ""
    assert m.cell("e", "s").to_dict()["multi_adapter"] is True
    assert m.cell("one", "s").supported and not m.cell("one", "s").multi_adapter
    assert m.cell("one", "s").multi_adapter_reason == (
        "engine one does not train several adapters at once yet (its declaration has no multi_adapter)")
    assert "server t does not serve several adapters' versions" in m.cell("e", "t").multi_adapter_reason
    both = m.cell("one", "t").multi_adapter_reason
    assert "engine one" in both and "server t" in both


def test_an_unsupported_pair_never_reads_multi_adapter():
    m = build_matrix([decl("e", "engine", multi_adapter=True, transports=("nccl-tensors",)),
                      decl("s", "server", multi_adapter=True)])
    cell = m.cell("e", "s")
    assert not cell.supported and not cell.multi_adapter and cell.multi_adapter_reason == "the pair is not supported"
    assert not m.cell("nope", "s").multi_adapter


def test_markdown_marks_multi_adapter_cells_and_says_why_the_others_are_not():
    m = build_matrix([decl("e", "engine", multi_adapter=True), decl("one", "engine"),
                      decl("s", "server", multi_adapter=True)])
    lines = m.to_markdown().splitlines()
    assert lines[2] == "| e | yes (multi) |" and lines[3] == "| one | yes [1] |"
    assert any(line.startswith("yes (multi): the pair also trains several adapters") for line in lines)
    assert "[1] one adapter at a time: engine one does not train several adapters at once yet" in lines[-1]
