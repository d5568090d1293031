"""Hugging Face checkpoint folders in and out: config.json plus *.safetensors.

Reading memory-maps each safetensors file and builds every parameter with
`jax.make_array_from_callback`, so each device reads only its own shard of each tensor and no
host ever holds a full copy per device. Only safetensors are read: pickle files (.bin, .pt)
are never opened.
"""

import json
import os
import pathlib
import struct
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medjax import partitioning
from medjax.models.config import ModelConfig, from_hf_config, to_hf_config
from medjax.models.transformer import DecoderLM

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and tensor."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-mapped, zero-copy numpy views of every tensor in one .safetensors file."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata=None
) -> None:
    """Writes numpy arrays (bfloat16 included) as one .safetensors file."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        header[name] = {
            "dtype": _CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # Align the data to 8 bytes, as the reference writer does.
    # Write beside and rename: a reader that memory-mapped the old file keeps its old inode
    # instead of faulting on a truncated mapping.
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(partial, path)


def _hf_name(path: tuple) -> tuple[str, bool]:
    """nnx state path -> (Hugging Face tensor name, whether the tensor is transposed)."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if parts == ["lm_head"]:
        return "lm_head.weight", True
    transposed = parts[-1] == "kernel"
    if transposed:
        parts[-1] = "weight"
    return "model." + ".".join(parts), transposed


def _checkpoint_files(
    folder: pathlib.Path, opened: dict[pathlib.Path, dict[str, np.ndarray]]
) -> dict[str, pathlib.Path]:
    """Tensor name -> file that holds it, from the index or from every *.safetensors (whose
    memory maps are kept in `opened`, so no file is mapped twice)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder}: holds only pickle weights ({', '.join(pickles)}) and no .safetensors."
                " medjax reads safetensors only and never unpickles files; convert them with"
                " transformers (model.save_pretrained(path, safe_serialization=True))."
            )
        raise CheckpointError(f"{folder}: no *.safetensors files.")
    names = {}
    for file in files:
        opened[file] = read_safetensors(file)
        names.update(dict.fromkeys(opened[file], file))
    return names


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (which may not exist): the loaders' dispatch rule."""
    path = pathlib.Path(path)
    return path.suffix == ".gguf" and not path.is_dir()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is what `from_pretrained` loads: a folder with config.json or a .gguf
    file."""
    path = pathlib.Path(path)
    return (path / "config.json").is_file() or (is_gguf(path) and path.is_file())


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """ModelConfig from `path`/config.json; `overrides` replace fields (e.g. dtype)."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model folder needs one.")
    try:
        return from_hf_config(json.loads(config_file.read_text()), **overrides)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.DEFAULT_RULES,
) -> DecoderLM:
    """Loads a Hugging Face Llama 3 / Qwen2 / Qwen3 folder, or a GGUF file, as a DecoderLM.

    Args:
      path: folder with config.json and model.safetensors (or sharded files with
        model.safetensors.index.json), or a `.gguf` file (see `gguf_checkpoint.from_gguf`).
      dtype: activations' dtype; also the parameters' unless `param_dtype` is given.
      param_dtype: parameters' dtype.
      mesh: place parameters sharded on this mesh by `rules`; None for the default device.
      rules: logical-axis rules (see medjax.partitioning).

    Raises:
      FileNotFoundError: no config.json.
      CheckpointError (a ValueError): pickle-only folder, missing or unexpected tensor, or a
        shape that does not match the config; the message names the tensor and both shapes.
    """
    folder = pathlib.Path(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    if is_gguf(folder):
        from medjax.models import gguf_checkpoint  # Imports the gguf library only when needed.

        return gguf_checkpoint.from_gguf(
            folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules
        )
    config = load_config(folder, dtype=dtype, param_dtype=param_dtype)
    opened: dict[pathlib.Path, dict[str, np.ndarray]] = {}
    files = _checkpoint_files(folder, opened)

    def tensor(name: str, hf_shape: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{folder}: missing tensor {name!r} (expected shape {hf_shape}).")
        file = files[name]
        if file not in opened:
            opened[file] = read_safetensors(file)
        if name not in opened[file]:
            raise CheckpointError(
                f"{file}: the index lists {name!r} but the file does not hold it."
            )
        source = opened[file][name]
        if tuple(source.shape) != hf_shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(source.shape)}; expected {hf_shape}."
            )
        return source

    model, expected = build_model(config, tensor, mesh=mesh, rules=rules)
    unexpected = sorted(
        n
        for n in files
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unexpected:
        for file in {files[n] for n in unexpected[:5]} - opened.keys():
            opened[file] = read_safetensors(file)
        shapes = [tuple(opened[files[n]][n].shape) for n in unexpected[:5]]
        listed = ", ".join(f"{n!r} {s}" for n, s in zip(unexpected, shapes, strict=False))
        raise CheckpointError(
            f"{folder}: unexpected tensors not in a {config.family} model: {listed}."
        )
    return model


def build_model(
    config: ModelConfig,
    tensor: Callable[[str, tuple[int, ...]], np.ndarray],
    *,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.DEFAULT_RULES,
) -> tuple[DecoderLM, set[str]]:
    """A DecoderLM whose parameters come from `tensor(hf_name, hf_shape)`.

    `tensor` returns each parameter in the Hugging Face layout (torch's [out, in] for linear
    weights) with exactly `hf_shape`, or raises CheckpointError naming it. Each parameter is
    placed on `mesh` by `rules` (the default device without a mesh), every device taking only
    its own shard. Returns the model and the set of Hugging Face names it read.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    expected = set()
    for path_tuple, variable in flat:
        name, transposed = _hf_name(path_tuple)
        expected.add(name)
        shape = variable.get_value().shape
        source = tensor(name, shape[::-1] if transposed else shape)
        source = source.T if transposed else source
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            axes = variable.get_metadata()["logical_axes"]
            sharding = partitioning.sharding_for(shape, axes, mesh, rules)
        variable.set_value(
            jax.make_array_from_callback(
                # A copy, never a view of the memory map: jax on CPU may alias host memory,
                # and the file may be rewritten while the model lives.
                shape,
                sharding,
                lambda idx, s=source: np.array(s[idx], dtype=config.param_dtype),
            )
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), expected


def _hf_tensors(model: DecoderLM, dtype) -> Iterator[tuple[str, np.ndarray]]:
    for path_tuple, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(path_tuple)
        array = np.asarray(jax.device_get(variable.get_value()))
        if dtype is not None:
            array = array.astype(dtype)
        yield name, array.T if transposed else array


def save_pretrained(
    model: DecoderLM, path: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 4 << 30
) -> None:
    """Writes a Hugging Face folder (config.json, safetensors) that transformers loads.

    Args:
      model: the model to export.
      path: folder, created if needed.
      dtype: dtype of the saved tensors; the parameters' own by default.
      max_shard_bytes: tensors go to model-0000i-of-0000n.safetensors files of at most this
        size plus model.safetensors.index.json when they do not fit in one file.
    """
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = to_hf_config(config)
    if dtype is not None:
        hf_config["dtype"] = np.dtype(dtype).name
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in _hf_tensors(model, dtype):
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard)
        weight_map.update({name: file for name in shard})
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
