"""Hostile Hugging Face checkpoint folders: each is refused with one CheckpointError line that
names the file and the tensor or field.

Files are written by the `safetensors` library and then corrupted by hand; a folder that
passes every check still loads, so the checks cannot be refusing everything.
"""

import json
import os
import re
import struct

import numpy as np
import pytest
import safetensors.numpy

from medjax import models
from medjax.models import checkpoint

CONFIG = models.ModelConfig(
    family="qwen3",
    vocab_size=17,
    hidden_size=8,
    intermediate_size=12,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    qk_norm=True,
    tie_word_embeddings=False,
)
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def model():
    # Weights drawn in numpy: initialising DecoderLM eagerly costs seconds on a busy CPU.
    rng = np.random.default_rng(0)
    model, _ = checkpoint.build_model(
        CONFIG, lambda name, shape: rng.standard_normal(shape).astype(np.float32)
    )
    return model


@pytest.fixture
def folder(model, tmp_path):
    """A checkpoint folder whose model.safetensors the safetensors library wrote."""
    folder = tmp_path / "ckpt"
    models.save_pretrained(model, folder)
    weights = safetensors.numpy.load_file(folder / "model.safetensors")
    safetensors.numpy.save_file(weights, folder / "model.safetensors")
    return folder


def split(path):
    """(header dict, data bytes) of a safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(path, header, data):
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def refused(match, path):
    """Asserts that loading `path` raises one CheckpointError line matching `match`."""
    with pytest.raises(models.CheckpointError, match=match) as info:
        models.from_pretrained(path)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def loads_like(path, weights):
    """Asserts that `path` loads and its embedding equals `weights[EMBED]`."""
    model = models.from_pretrained(path)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), weights[EMBED])


def test_library_written_folder_loads(folder):
    weights = safetensors.numpy.load_file(folder / "model.safetensors")
    loads_like(folder, weights)


# --- safetensors files -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["length", "header", "data"])
def test_truncated_file(folder, where):
    file = folder / "model.safetensors"
    header, data = split(file)
    blob = file.read_bytes()
    header_end = len(blob) - len(data)
    keep = {"length": 5, "header": header_end - 10, "data": len(blob) - 3}[where]
    file.write_bytes(blob[:keep])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    start, end = header[last]["data_offsets"]
    match = {
        "length": r"truncated: 5 bytes, shorter than the 8-byte header length",
        "header": rf"header length {header_end - 8} exceeds the {header_end - 18} bytes",
        "data": rf"tensor {last!r} has data_offsets \[{start}, {end}\] past the {end - 3} bytes",
    }[where]
    refused(re.escape(str(file)) + ": " + match, folder)


@pytest.mark.parametrize(
    ("at", "junk"), [(20, b"\x00" * 16), (8, b"\xff\xfe\x00garbage")], ids=["nul", "not-utf8"]
)
def test_garbled_header(folder, at, junk):
    file = folder / "model.safetensors"
    blob = bytearray(file.read_bytes())
    blob[at : at + len(junk)] = junk  # Same header length, bytes replaced.
    file.write_bytes(bytes(blob))
    refused(re.escape(str(file)) + r": the header is not valid JSON \(", folder)


def test_tensor_named_twice(folder):
    file = folder / "model.safetensors"
    header, data = split(file)
    # Plain json.loads would keep the second entry and drop the first without a word.
    head = (json.dumps(header)[:-1] + f', "{EMBED}": {json.dumps(header[EMBED])}}}').encode()
    head += b" " * (-len(head) % 8)
    file.write_bytes(struct.pack("<Q", len(head)) + head + data)
    refused(re.escape(str(file)) + rf": the header names {EMBED!r} twice", folder)


def test_overlapping_tensors(folder):
    file = folder / "model.safetensors"
    header, data = split(file)
    # Two tensors of the same shape: the later one is pointed at the earlier one's bytes.
    a, b = sorted(
        ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"],
        key=lambda k: header[k]["data_offsets"],
    )
    header[b]["data_offsets"] = header[a]["data_offsets"]
    join(file, header, data)
    start, end = header[a]["data_offsets"]
    refused(
        re.escape(str(file)) + rf": tensors {a!r} and {b!r} overlap \(bytes {start} to {end} ",
        folder,
    )


def test_offsets_past_the_end(folder):
    file = folder / "model.safetensors"
    header, data = split(file)
    start, end = header[EMBED]["data_offsets"]
    header[EMBED]["data_offsets"] = [start + len(data), end + len(data)]
    join(file, header, data)
    refused(
        re.escape(str(file))
        + rf": tensor {EMBED!r} has data_offsets \[{start + len(data)}, {end + len(data)}\]"
        rf" past the {len(data)} bytes of data",
        folder,
    )


def test_bytes_that_belong_to_no_tensor(folder):
    file = folder / "model.safetensors"
    header, data = split(file)
    join(file, header, data + bytes(8))
    refused(re.escape(str(file)) + r": the last 8 bytes of data belong to no tensor", folder)


def test_offsets_that_disagree_with_the_shape(folder):
    file = folder / "model.safetensors"
    header, data = split(file)
    header[EMBED]["shape"] = [17, 7]  # The bytes hold [17, 8].
    join(file, header, data)
    refused(
        re.escape(str(file)) + rf": tensor {EMBED!r} spans 544 bytes but F32 of shape \(17, 7\)"
        r" needs 476",
        folder,
    )


@pytest.mark.parametrize(("dtype", "code"), [(np.int8, "I8"), (np.bool_, "BOOL")])
def test_weight_that_is_not_floating_point(folder, dtype, code):
    file = folder / "model.safetensors"
    weights = safetensors.numpy.load_file(file)
    weights["model.norm.weight"] = np.ones(8, dtype)  # The right shape, the wrong kind.
    safetensors.numpy.save_file(weights, file)
    refused(
        re.escape(str(file)) + rf": tensor 'model\.norm\.weight' has dtype {code}; a weight must"
        r" be floating point",
        folder,
    )


# --- config.json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", "64", r"'hidden_size' must be an integer >= 1, got '64' \(str\)"),
        ("hidden_size", 64.5, r"'hidden_size' must be an integer >= 1, got 64\.5 \(float\)"),
        ("hidden_size", True, r"'hidden_size' must be an integer >= 1, got True \(bool\)"),
        ("num_hidden_layers", 0, r"'num_hidden_layers' must be an integer >= 1, got 0 \(int\)"),
        ("vocab_size", None, r"'vocab_size' is missing"),
        ("rms_norm_eps", "1e-6", r"'rms_norm_eps' must be a positive number, got '1e-6'"),
        ("tie_word_embeddings", "false", r"'tie_word_embeddings' must be true or false"),
        ("eos_token_id", [1, "2"], r"'eos_token_id' must be an integer >= 0, got '2' \(str\)"),
        ("rope_parameters", "default", r"'rope_parameters' must be an object, got str"),
    ],
    ids=["str", "float", "bool", "zero", "null", "eps-str", "bool-str", "eos-list", "rope-str"],
)
def test_wrongly_typed_config_field(folder, field, value, message):
    config_file = folder / "config.json"
    hf = json.loads(config_file.read_text())
    hf[field] = value
    config_file.write_text(json.dumps(hf))
    refused(re.escape(str(config_file)) + ": " + message, folder)


def test_garbled_config(folder):
    config_file = folder / "config.json"
    config_file.write_text('{"model_type": "qwen3", ')
    refused(re.escape(str(config_file)) + r": not valid JSON \(", folder)


# --- the folder's boundary ---------------------------------------------------------------------


@pytest.fixture
def sharded(model, tmp_path):
    """A folder of several shards and model.safetensors.index.json."""
    folder = tmp_path / "sharded"
    models.save_pretrained(model, folder, max_shard_bytes=600)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def test_sharded_folder_loads(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    loads_like(sharded, safetensors.numpy.load_file(sharded / index["weight_map"][EMBED]))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "absolute"])
def test_index_entry_outside_the_folder(sharded, entry):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sharded / index["weight_map"][EMBED]
    outside = sharded.parent / "outside.safetensors"
    shard.rename(outside)  # A valid file: only where it lies is wrong.
    entry = str(outside) if entry == "absolute" else entry
    index["weight_map"] = {
        name: entry if sharded / file == shard else file
        for name, file in index["weight_map"].items()
    }
    index_file.write_text(json.dumps(index))
    first = next(n for n, f in index["weight_map"].items() if f == entry)
    refused(
        re.escape(str(index_file))
        + rf": tensor {first!r} maps to {re.escape(repr(entry))}, which resolves to"
        + rf" {re.escape(str(outside))}, outside the checkpoint folder {re.escape(str(sharded))}",
        sharded,
    )


def test_index_entry_that_does_not_exist(sharded):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"][EMBED]
    (sharded / shard).unlink()
    refused(
        re.escape(str(index_file)) + rf": tensor '.*' maps to {shard!r}, which does not exist",
        sharded,
    )


def test_symlink_outside_the_folder(folder):
    """Policy: every file must resolve inside the folder, so a symlink out is refused."""
    outside = folder.parent / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    refused(
        re.escape(str(folder / "model.safetensors"))
        + rf": resolves to {re.escape(str(outside))}, outside the checkpoint folder",
        folder,
    )


def test_config_symlink_outside_the_folder(folder):
    outside = folder.parent / "config.json"
    (folder / "config.json").rename(outside)
    (folder / "config.json").symlink_to(outside)
    refused(re.escape(str(folder / "config.json")) + r": resolves to .*, outside", folder)


def test_symlinks_inside_the_folder_load(folder):
    """Links that stay inside are allowed, and so is a link to the folder itself."""
    weights = safetensors.numpy.load_file(folder / "model.safetensors")
    (folder / "blobs").mkdir()
    (folder / "model.safetensors").rename(folder / "blobs" / "weights.safetensors")
    (folder / "model.safetensors").symlink_to(os.path.join("blobs", "weights.safetensors"))
    link = folder.parent / "latest"
    link.symlink_to(folder.name)
    loads_like(link, weights)


def hf_cache_repo(folder, root):
    """`folder` laid out as the Hugging Face cache does: <root>/snapshots/<rev>/<file> are
    relative symlinks to <root>/blobs/<hash>."""
    snapshot = root / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, file in enumerate(sorted(folder.iterdir())):
        file.rename(root / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    return snapshot


def test_hf_cache_snapshot_loads(folder, tmp_path):
    """Snapshot files link out of the snapshot folder into ../../blobs, inside the cache repo."""
    weights = safetensors.numpy.load_file(folder / "model.safetensors")
    snapshot = hf_cache_repo(folder, tmp_path / "models--tiny--qwen3")
    assert (snapshot / "model.safetensors").is_symlink()
    loads_like(snapshot, weights)


def test_hf_cache_snapshot_link_outside_the_repo(folder, tmp_path):
    root = tmp_path / "models--tiny--qwen3"
    snapshot = hf_cache_repo(folder, root)
    outside = tmp_path / "stray.safetensors"
    (snapshot / "model.safetensors").resolve().rename(outside)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(outside)
    refused(
        re.escape(str(snapshot / "model.safetensors"))
        + rf": resolves to {re.escape(str(outside))}, outside the checkpoint folder"
        + rf" {re.escape(str(root))}",
        snapshot,
    )


# ---------------------------------------------------------------------------------------
# Keep-last-K after a kill: a training stage's orbax checkpoints (medjax.training).


def _saved_steps(directory):
    return sorted(int(e) for e in os.listdir(directory) if e.isdigit())


@pytest.mark.parametrize(("saved", "keep", "left"), [
    ((1, 2, 3), 2, [2, 3]),  # A kill between the last save's commit and orbax's removal.
    ((5, 10, 15, 20), 1, [20]),  # keep_checkpoints lowered for the rerun.
    ((4, 8), 2, [4, 8]),  # Nothing to remove.
])  # fmt: skip
def test_opening_a_checkpoint_folder_keeps_the_newest_k(tmp_path, saved, keep, left):
    import jax.numpy as jnp

    from medjax.training import checkpoints

    directory = tmp_path / "checkpoints"
    # What a killed process leaves: more committed checkpoints than `keep` (written here by
    # a checkpointer that keeps them all, as orbax does until its removal after the save).
    writer = checkpoints.Checkpointer(
        str(directory), save_every=1, keep=len(saved), async_save=False
    )
    for step in saved:
        writer.save(step, {"w": jnp.full(3, float(step))}, {"step": step})
    writer.close()
    assert _saved_steps(directory) == list(saved)

    resumed = checkpoints.Checkpointer(str(directory), save_every=1, keep=keep, async_save=False)
    assert _saved_steps(directory) == left
    assert resumed.latest_step() == saved[-1]
    state, meta = resumed.restore(saved[-1], {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(3, float(saved[-1])))
    assert meta == {"step": saved[-1]}
    resumed.close()
