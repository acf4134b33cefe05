"""Save/load of compressed models: identical outputs, refusal of wrong or damaged files."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank_ops import LoRALinear, compress, load_compressed, save_compressed


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture
def saved(tmp_path):
    original = make_model()
    model = copy.deepcopy(original)
    compress(model, "lowrank", rank=3, exclude=["4"])
    model[4] = LoRALinear.from_linear(model[4], rank=2)
    with torch.no_grad():
        model[4].lora_b.normal_()  # as after fine-tuning
    path = save_compressed(model, tmp_path / "m.safetensors")
    return original, model, path


def test_roundtrip_gives_identical_outputs(saved):
    original, model, path = saved
    fresh = copy.deepcopy(original)
    assert load_compressed(fresh, path) is fresh
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))
    assert type(fresh[0]).__name__ == "LowRankLinear" and isinstance(fresh[4], LoRALinear)
    assert not fresh[4].weight.requires_grad


def test_tied_weights_are_saved(tmp_path):
    model = make_model()
    model[2].weight = nn.Parameter(model[0].weight.t().contiguous())
    model.add_module("tied", model[4])  # the same module under two names
    compress(model, "lowrank", rank=2, include=["0"])
    path = save_compressed(model, tmp_path / "t.safetensors")
    assert path.exists()


def _assert_unchanged(model, reference):
    assert [type(m) for m in model] == [type(m) for m in reference]
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k


def test_wrong_architecture_is_refused(saved):
    _, _, path = saved
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    reference = copy.deepcopy(other)
    with pytest.raises(ValueError, match="model"):
        load_compressed(other, path)
    _assert_unchanged(other, reference)


def test_damaged_tensor_bytes_are_refused(saved, tmp_path):
    original, _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    fresh = copy.deepcopy(original)
    with pytest.raises(ValueError, match="damaged"):
        load_compressed(fresh, bad)
    _assert_unchanged(fresh, original)


def test_truncated_and_foreign_files_are_refused(saved, tmp_path):
    original, _, path = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_compressed(copy.deepcopy(original), cut)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a lowrank_ops checkpoint"):
        load_compressed(copy.deepcopy(original), foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load_compressed(copy.deepcopy(original), garbage)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_compressed(copy.deepcopy(original), tmp_path / "missing.safetensors")


def test_damaged_header_is_refused(saved, tmp_path):
    original, _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["lowrank_ops"])
    header["layers"]["0"]["format"] = "mystery"
    bad = tmp_path / "hdr.safetensors"
    save_file(tensors, str(bad), metadata={"lowrank_ops": json.dumps(header)})
    with pytest.raises(ValueError, match="unknown format"):
        load_compressed(copy.deepcopy(original), bad)
    header["version"] = 99
    save_file(tensors, str(bad), metadata={"lowrank_ops": json.dumps(header)})
    with pytest.raises(ValueError, match="version"):
        load_compressed(copy.deepcopy(original), bad)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        save_compressed("model", "x.safetensors")
    with pytest.raises(TypeError, match="path"):
        load_compressed(make_model(), 42)
    with pytest.raises(ValueError, match="no compressed layer|found none"):
        save_compressed(make_model(), "never-written.safetensors")
