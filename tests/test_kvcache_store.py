"""Saving and loading compressed KV caches (lowrank_ops/kvcache/store.py): bit-exact round trips
that keep growing as the saved cache would, only the valid tail rows written, and refusal of
foreign, damaged or inconsistent files before anything is built from them."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_ops.core.files import write_file
from lowrank_ops.kvcache import GEARConfig, GEARKV, UncompressedState, compress, load_kv, save_kv
from lowrank_ops.kvcache.format import TENSOR_FIELDS
from lowrank_ops.kvcache.store import STORE_KEY, STORE_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "default": GEARConfig(),
    "4bit-fp16-factors": GEARConfig(bits=4, group_size=64, rank=2, outlier_ratio=0.0, factor_bits=16),
    "2bit-g16-b32-10%": GEARConfig(bits=2, group_size=16, rank=0, outlier_ratio=0.1, buffer_tokens=32),
    "prefix-8": GEARConfig(prefix_tokens=8),  # t = 5: a partial prefix, no tail yet
}


def kv_pair(b, t, d=64, h=2, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=gen).to(dtype), torch.randn(b, h, t, d, generator=gen).to(dtype))


def assert_same_cache(a: GEARKV, b: GEARKV):
    assert a.config == b.config and a.tail_len == b.tail_len
    for name in TENSOR_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if name.startswith("tail_"):
            x, y = x[:, :, : a.tail_len], y[:, :, : b.tail_len]
        assert x.dtype == y.dtype and torch.equal(x, y), name


def stored(path):
    """The header and tensors of a saved file, as written."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[STORE_KEY])
        return header, {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, entries, tensors):
    """A file with a valid digest around chosen contents (what a faulty writer could produce)."""
    write_file(tensors, path, STORE_KEY, {"version": STORE_VERSION, "layers": entries})


@pytest.fixture
def saved(tmp_path):
    kv = compress(*kv_pair(2, 150, d=128), GEARConfig())  # 3 outliers per vector
    return kv, save_kv(kv, tmp_path / "kv.safetensors")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("t", [5, 128, 150])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roundtrip_is_bit_exact_and_keeps_growing_alike(tmp_path, t, name, dtype):
    kv = compress(*kv_pair(2, t, dtype=dtype), CONFIGS[name])
    [loaded] = load_kv(save_kv(kv, tmp_path / "kv.safetensors"))
    assert_same_cache(loaded, kv)
    assert loaded.nbytes == kv.nbytes and loaded.tail_keys.shape == kv.tail_keys.shape
    for x, y in zip(loaded.decompress_reference(), kv.decompress_reference()):
        assert torch.equal(x, y)
    more = kv_pair(2, 70, dtype=dtype, seed=1)  # crosses at least one block boundary
    assert_same_cache(loaded.append(*more), kv.append(*more))


def test_a_file_from_before_the_prefix_loads_as_a_cache_without_one(tmp_path):
    """Such a file has neither the prefix tensors nor the setting: it was a cache without a prefix."""
    kv = compress(*kv_pair(2, 150), GEARConfig(prefix_tokens=0))
    header, tensors = stored(save_kv(kv, tmp_path / "kv.safetensors"))
    del tensors["layers.0.prefix_keys"], tensors["layers.0.prefix_values"], header["layers"][0]["config"]["prefix_tokens"]
    rewrite(tmp_path / "old.safetensors", header["layers"], tensors)
    [loaded] = load_kv(tmp_path / "old.safetensors")
    assert loaded.config.prefix_tokens == 0
    assert_same_cache(loaded, kv)
    header["layers"][0]["config"]["prefix_tokens"] = 0  # a current file must hold the prefix tensors
    rewrite(tmp_path / "bad.safetensors", header["layers"], tensors)
    with pytest.raises(ValueError, match="expected tensors"):
        load_kv(tmp_path / "bad.safetensors")


def test_several_layers_uncompressed_and_empty_layers(tmp_path):
    kvs = [compress(*kv_pair(1, 90, seed=i), GEARConfig(bits=2 + 2 * i)) for i in range(2)]  # per-layer configs
    window = UncompressedState(*kv_pair(1, 24, dtype=torch.float32, seed=5), window=25, seen=90)
    full = UncompressedState(*kv_pair(1, 90, seed=6), window=None, seen=90)
    layers = load_kv(save_kv([kvs[0], window, None, kvs[1], full], tmp_path / "kv.safetensors"))
    assert [type(x).__name__ for x in layers] == ["GEARKV", "UncompressedState", "NoneType", "GEARKV",
                                                  "UncompressedState"]
    assert_same_cache(layers[0], kvs[0])
    assert_same_cache(layers[3], kvs[1])
    for got, saved in ((layers[1], window), (layers[4], full)):
        assert torch.equal(got.keys, saved.keys) and torch.equal(got.values, saved.values)
        assert (got.window, got.seen) == (saved.window, saved.seen)


def test_only_the_valid_tail_rows_are_written(tmp_path):
    kv = compress(*kv_pair(1, 101), GEARConfig())  # the prefix token, a block, 36 tail tokens
    kv.tail_len -= 6  # as after a crop: the dropped rows stay in the buffer
    _, tensors = stored(save_kv(kv, tmp_path / "kv.safetensors"))
    assert tensors["layers.0.tail_keys"].shape[2] == tensors["layers.0.tail_values"].shape[2] == 30
    [loaded] = load_kv(tmp_path / "kv.safetensors")
    assert loaded.tail_len == 30 and not loaded.tail_keys[:, :, 30:].any()


def test_saving_changes_nothing_and_replaces_a_file_whole(tmp_path, saved):
    kv, path = saved
    before = {name: t.clone() for name, t in kv.tensors().items()}
    save_kv(kv, path)  # over the existing file
    assert all(torch.equal(before[name], t) for name, t in kv.tensors().items())
    old = path.read_bytes()
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        save_kv([kv, "not a layer"], path)
    assert path.read_bytes() == old and not list(tmp_path.glob("*.tmp"))


def test_moving_a_cache_and_an_uncompressed_state():
    kv = compress(*kv_pair(1, 90), GEARConfig())
    same = kv.to("cpu")
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(same.tensors().values(), kv.tensors().values()))
    moved = kv.to("meta")
    assert moved.config == kv.config and moved.tail_len == kv.tail_len
    assert all(t.is_meta for t in moved.tensors().values()) and not any(t.is_meta for t in kv.tensors().values())
    state = UncompressedState(*kv_pair(1, 24), window=25, seen=90).to("meta")
    assert state.keys.is_meta and state.values.is_meta and (state.window, state.seen) == (25, 90)


# ----------------------------------------------------------------------------- refusals
def test_bad_arguments(saved, tmp_path):
    kv, path = saved
    with pytest.raises(TypeError, match="layers"):
        save_kv("kv", tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="path"):
        save_kv(kv, 42)
    with pytest.raises(ValueError, match="at least one filled layer"):
        save_kv([None, None], tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="device"):
        load_kv(path, device=3)
    with pytest.raises(FileNotFoundError, match="no KV-cache file"):
        load_kv(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="seen: expected an int >= the 24 tokens kept"):
        save_kv([UncompressedState(*kv_pair(1, 24), window=25, seen=10)], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="seen: expected 24 .a full layer keeps every token"):
        save_kv([UncompressedState(*kv_pair(1, 24), window=None, seen=30)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_foreign_and_damaged_files_are_refused(saved, tmp_path):
    _, path = saved
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"lowrank_ops": "{}"})  # e.g. a model checkpoint
    with pytest.raises(ValueError, match="not a lowrank_ops KV-cache"):
        load_kv(foreign)
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's bytes
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_kv(damaged)
    header, tensors = stored(path)
    save_file(tensors, str(damaged), metadata={STORE_KEY: json.dumps({**header, "version": 99})})
    with pytest.raises(ValueError, match="version 99"):
        load_kv(damaged)


def _edited(path, tmp_path, edit):
    header, tensors = stored(path)
    entries = header["layers"]
    edit(entries, tensors)
    out = tmp_path / "edited.safetensors"
    rewrite(out, entries, tensors)
    return out


def _set_channel(tensors, value, slot=0):
    idx = tensors["layers.0.key_out_idx"].clone()
    idx[0, 0, 0, slot] = value
    tensors["layers.0.key_out_idx"] = idx


@pytest.mark.parametrize("edit, match", [
    (lambda e, t: _set_channel(t, 128), "key_out_idx: expected channels below head_dim=128, got 128"),
    (lambda e, t: _set_channel(t, int(t["layers.0.key_out_idx"][0, 0, 0, 1])), "distinct channels"),
    (lambda e, t: e[0]["config"].update(bits=3), "bits"),
    (lambda e, t: e[0]["config"].update(unknown=1), "unknown"),
    (lambda e, t: e[0].update(kind="mystery"), "unknown kind"),
    (lambda e, t: e[0].update(tail_len=5), "tail_len=5"),
    (lambda e, t: t.pop("layers.0.value_zero"), "expected tensors"),
    (lambda e, t: t.update({"layers.0.key_scale": t["layers.0.key_scale"][:, :, 1:].clone()}), "key_scale: expected shape"),
    (lambda e, t: t.update({"layers.3.keys": torch.zeros(1)}), "of no listed layer"),
    (lambda e, t: e.append({"kind": "uncompressed", "window": 8, "seen": 1}), "expected tensors"),
])
def test_inconsistent_files_are_refused(saved, tmp_path, edit, match):
    _, path = saved
    with pytest.raises(ValueError, match=match):
        load_kv(_edited(path, tmp_path, edit))


@pytest.mark.gpu
def test_gpu_load_onto_the_device_and_attend(saved):
    from lowrank_ops.kvcache import attention, attention_reference

    kv, path = saved
    [loaded] = load_kv(path, device="cuda")
    assert all(t.is_cuda for t in loaded.tensors().values())
    q = torch.randn(2, 8, 1, 128, dtype=torch.float16, device="cuda")
    expected = attention_reference(q.cpu().float(), kv).to(q.device)
    torch.testing.assert_close(attention(q, loaded).float(), expected, atol=2e-3, rtol=2e-3)
