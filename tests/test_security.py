"""Security basics, each checked: no pickle loads (safetensors, ``weights_only=True``), no remote code unless a
config key asks (with a warning), no file paths taken from archive member names."""

from __future__ import annotations

import ast
import io
import logging
import pickle
import tarfile
from pathlib import Path

import pytest

import fvl
from fvl.train.checkpointing import AtomicCheckpointIO

SOURCES = sorted(Path(fvl.__file__).parent.rglob("*.py"))


def calls(name: str):
    """Every call in fvl's sources whose function is ``name`` or ``*.name``: (file, line, ast.Call)."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node.lineno, node


def keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_refuses_pickled_code():
    found = list(calls("load"))
    torch_loads = [(p, n, c) for p, n, c in found if ast.unparse(c.func) == "torch.load"]
    assert torch_loads  # the one for Lightning's .ckpt
    for path, line, node in torch_loads:
        value = keyword(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{line}"


def test_lightning_checkpoints_load_without_running_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)


def test_remote_code_runs_only_when_a_config_key_asks():
    for name in ("from_pretrained", "for_model"):
        for path, line, node in calls(name):
            value = keyword(node, "trust_remote_code")
            assert value is None or not (isinstance(value, ast.Constant) and value.value is True), (
                f"{path}:{line}"
            )
    literal = [p for p in SOURCES if "trust_remote_code=True" in p.read_text()]
    assert not literal


def test_trust_remote_code_is_passed_through_with_a_warning(tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    from fvl.config import load
    from fvl.convert import export
    from fvl.models import build_model
    from fvl.models.llm import build_llm

    export(build_model(load("tiny").model), tmp_path / "exported")
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    llm = load("tiny", ["model.llm.init=pretrained", f"model.llm.path={tmp_path / 'exported' / 'llm'}"]).model
    build_llm(llm.llm, llm.text)
    assert seen["trust_remote_code"] is False
    llm.llm.trust_remote_code = True
    with caplog.at_level(logging.WARNING, logger="fvl"):
        build_llm(llm.llm, llm.text)
    assert seen["trust_remote_code"] is True and "trust_remote_code=true" in caplog.text


def test_archive_member_names_never_become_paths(tmp_path, monkeypatch):
    """A shard whose members are named ../../x is read in memory; fvl never extracts tars to disk."""
    from fvl.data.tarindex import parse_sample, scan

    assert not [(p, n) for name in ("extract", "extractall") for p, n, _ in calls(name)]
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        for member, data in (("../../escaped.json", b'{"conversations": []}'), ("/abs/escaped.png", b"x")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.chdir(tmp_path / ".")
    for span in scan(shard):
        parse_sample(shard.read_bytes()[span["start"] : span["end"]])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.tar"]
    assert not Path("/abs/escaped.png").exists() and not (tmp_path.parent.parent / "escaped.json").exists()


def test_model_checkpoints_are_safetensors(tmp_path):
    from safetensors import safe_open

    from fvl.config import load
    from fvl.models import build_model, save_checkpoint

    path = save_checkpoint(build_model(load("tiny").model), tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:  # a safetensors file: tensors and a JSON header, no code
        assert "fvl_config" in f.metadata() and len(list(f.keys())) > 10
    assert path.read_bytes()[:2] != b"PK"  # not a torch.save zip archive (which holds a pickle)
