"""Hugging Face checkpoint folders in and out: config.json plus *.safetensors.

Reading memory-maps each safetensors file and builds every parameter with
`jax.make_array_from_callback`, so each device reads only its own shard of each tensor and no
host ever holds a full copy per device. Only safetensors are read: pickle files (.bin, .pt)
are never opened.

Every file is checked before it is mapped: the header must be JSON whose tensors tile the data
exactly (no overlap, no hole, nothing past the end), weights must be floating point, and
config.json, the index and every weight file must resolve inside the checkpoint folder (see
`_checkpoint_root`). Each failure is one CheckpointError line naming the file and the tensor
or field.
"""

import functools
import json
import os
import pathlib
import struct
import zlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from medjax import partitioning, paths
from medjax.models.config import ModelConfig, from_hf_config, to_hf_config
from medjax.models.transformer import DecoderLM, new_lora_a

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
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# The reference reader's limit; a larger length means a corrupt file, not a big model.
_MAX_HEADER_BYTES = 100 << 20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Buffers some exporters write that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and tensor."""


def _no_duplicates(path: pathlib.Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: the header names {key!r} twice.")
            out[key] = value
        return out

    return hook


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(path: pathlib.Path) -> tuple[int, int, dict]:
    """(header length, bytes of data after the header, header dict) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(
                    f"{path}: truncated: {size} bytes, shorter than the 8-byte header length."
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header length {header_len} exceeds the {size - 8} bytes that"
                    " follow it; the file is truncated or not safetensors."
                )
            if header_len > _MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {header_len} is over {_MAX_HEADER_BYTES} bytes;"
                    " the file is corrupt or not safetensors."
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}).") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates(path))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both.
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the header is not valid JSON ({e}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the header is JSON {type(header).__name__}, not an object of tensors."
        )
    return header_len, size - 8 - header_len, header


def _check_tensor(path: pathlib.Path, name: str, info, data_size: int) -> tuple[int, int]:
    """The [start, end) byte range of tensor `name`, its header entry `info` validated."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(
            f"{path}: tensor {name!r} needs dtype, shape and data_offsets in the header."
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}.")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; not a list of sizes.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(n) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r}; not [start, end] with"
            " 0 <= start <= end."
        )
    start, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets [{start}, {end}] past the {data_size}"
            " bytes of data; the file is truncated or its header is corrupt."
        )
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
    if end - start != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - start} bytes but {dtype} of shape"
            f" {tuple(shape)} needs {nbytes}."
        )
    return start, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-mapped, zero-copy numpy views of every tensor in one .safetensors file.

    Raises:
      CheckpointError: the file is unreadable, truncated, or its header is not JSON, names an
        unsupported dtype, or gives byte ranges that overlap, leave holes or run past the end
        (the safetensors format requires the tensors to tile the data exactly); the message
        names the file and the tensor.
    """
    path = pathlib.Path(path)
    header_len, data_size, header = _read_header(path)
    spans = []
    for name, info in header.items():
        if name != "__metadata__":
            spans.append((*_check_tensor(path, name, info, data_size), name))
    previous_end, previous = 0, None
    # Sorted by (start, end), so an empty tensor at a neighbour's start sorts first.
    for start, end, name in sorted(spans):
        if start < previous_end:
            raise CheckpointError(
                f"{path}: tensors {previous!r} and {name!r} overlap (bytes {start} to"
                f" {min(end, previous_end)} of the data belong to both)."
            )
        if start > previous_end:
            raise CheckpointError(
                f"{path}: bytes {previous_end} to {start} of the data, before tensor {name!r},"
                " belong to no tensor."
            )
        previous_end, previous = end, name
    if previous_end != data_size:
        raise CheckpointError(
            f"{path}: the last {data_size - previous_end} bytes of data belong to no tensor."
        )
    if data_size:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    else:  # numpy cannot map zero bytes.
        data = np.zeros(0, np.uint8)
    return {
        name: data[start:end].view(_DTYPES[header[name]["dtype"]]).reshape(header[name]["shape"])
        for start, end, name in spans
    }


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
    if paths.is_remote(path):  # No rename there; an object appears whole when closed.
        with epath.Path(path).open("wb") as f:
            _write_tensor_bytes(f, blob, arrays)
        return
    # Write beside and rename: a reader that memory-mapped the old file keeps its old inode
    # instead of faulting on a truncated mapping.
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        _write_tensor_bytes(f, blob, arrays)
    os.replace(partial, path)


def _write_tensor_bytes(f, blob: bytes, arrays: list[np.ndarray]) -> None:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays:
        f.write(array.tobytes())


def _stacked(path: tuple, config: ModelConfig) -> bool:
    """Whether the parameter at `path` holds every layer on a leading axis (scan_layers)."""
    return config.scan_layers and path[0] == "layers"


def _hf_names(path: tuple, config: ModelConfig) -> tuple[list[str], bool]:
    """nnx state path -> (its Hugging Face tensor names, whether they are transposed): one
    name, or one per layer for a stacked parameter, in layer order."""
    if _stacked(path, config):
        names = [_hf_name((path[0], i, *path[1:])) for i in range(config.num_layers)]
        return [n for n, _ in names], names[0][1]
    name, transposed = _hf_name(path)
    return [name], transposed


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


def _checkpoint_root(folder: pathlib.Path) -> pathlib.Path:
    """The folder every file of the checkpoint `folder` must resolve inside.

    That is the folder itself, symlinks resolved: an index entry or a symlink that leads
    elsewhere would make a downloaded checkpoint read whatever file it names (another model's
    weights, a device that never ends) while looking self-contained. The one exception is a
    Hugging Face cache snapshot (<repo>/snapshots/<revision>/), whose files are symlinks into
    <repo>/blobs/: there the root is <repo>.
    """
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and (resolved.parent.parent / "blobs").is_dir():
        return resolved.parent.parent
    return resolved


def _resolve_inside(file: pathlib.Path, root: pathlib.Path) -> str | None:
    """Why `file` may not be read (outside `root`, missing, not a regular file), or None."""
    resolved = file.resolve()
    if not resolved.is_relative_to(root):
        return f"resolves to {resolved}, outside the checkpoint folder {root}"
    if not resolved.exists():
        return "does not exist"
    if not resolved.is_file():
        return "is not a regular file"
    return None


def _checkpoint_files(
    folder: pathlib.Path, opened: dict[pathlib.Path, dict[str, np.ndarray]]
) -> dict[str, pathlib.Path]:
    """Tensor name -> file that holds it, from the index or from every *.safetensors (whose
    memory maps are kept in `opened`, so no file is mapped twice)."""
    root = _checkpoint_root(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        if problem := _resolve_inside(index, root):
            raise CheckpointError(f"{index}: {problem}.")
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a JSON object ({e}).") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' is missing or not an object.")
        files = {}
        checked: dict[str, str | None] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index}: tensor {name!r} maps to {file!r}, not a .safetensors file."
                )
            if file not in checked:
                checked[file] = _resolve_inside(folder / file, root)
            if checked[file]:
                raise CheckpointError(
                    f"{index}: tensor {name!r} maps to {file!r}, which {checked[file]}."
                )
            files[name] = folder / file
        return files
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
        if problem := _resolve_inside(file, root):
            raise CheckpointError(f"{file}: {problem}.")
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
    path = epath.Path(path) if paths.is_remote(path) else pathlib.Path(path)
    return (path / "config.json").is_file() or (is_gguf(path) and path.is_file())


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """ModelConfig from `path`/config.json; `overrides` replace fields (e.g. dtype)."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model folder needs one.")
    if problem := _resolve_inside(config_file, _checkpoint_root(pathlib.Path(path))):
        raise CheckpointError(f"{config_file}: {problem}.")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e}).") from None
    try:
        return from_hf_config(hf, **overrides)
    except (KeyError, ValueError) as e:
        # from_hf_config names "config.json" itself; here the full path replaces it.
        raise CheckpointError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from e


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: partitioning.Rules = partitioning.DEFAULT_RULES,
    **options,
) -> DecoderLM:
    """Loads a Hugging Face Llama 3 / Qwen2 / Qwen3 folder, or a GGUF file, as a DecoderLM.

    Args:
      path: folder with config.json and model.safetensors (or sharded files with
        model.safetensors.index.json), local or remote (`gs://...`, copied to a temporary
        local folder first), or a local `.gguf` file (see `gguf_checkpoint.from_gguf`).
      dtype: activations' dtype; also the parameters' unless `param_dtype` is given.
      param_dtype: parameters' dtype.
      mesh: place parameters sharded on this mesh by `rules`; None for the default device.
      rules: logical-axis rules (see medjax.partitioning).
      **options: how the model runs, ModelConfig's `scan_layers` and `remat`.

    Raises:
      FileNotFoundError: no config.json.
      CheckpointError (a ValueError): pickle-only folder, a config.json field that is missing
        or wrongly typed, a corrupt safetensors file or index, a file that resolves outside
        the folder, a missing or unexpected tensor, a weight that is not floating point, or a
        shape that does not match the config; one line naming the file and tensor or field.
    """
    if paths.is_remote(path) and not is_gguf(path):
        # The reader memory-maps local files: load a temporary local copy (the arrays are
        # on the devices when it is removed).
        with paths.local_copy(path) as local:
            return from_pretrained(
                local, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **options
            )
    folder = pathlib.Path(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    if is_gguf(folder):
        from medjax.models import gguf_checkpoint  # Imports the gguf library only when needed.

        return gguf_checkpoint.from_gguf(
            folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **options
        )
    config = load_config(folder, dtype=dtype, param_dtype=param_dtype, **options)
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
        if _CODES[source.dtype] not in _FLOAT_CODES:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {_CODES[source.dtype]}; a weight must be"
                f" floating point ({', '.join(_FLOAT_CODES)})."
            )
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
        if isinstance(variable, nnx.LoRAParam):  # Not in the checkpoint: a new adapter.
            variable.set_value(_new_adapter(path_tuple, variable, config, mesh, rules))
            continue
        names, transposed = _hf_names(path_tuple, config)
        expected.update(names)
        shape = variable.get_value().shape
        one = shape[1:] if _stacked(path_tuple, config) else shape
        sources = [tensor(name, one[::-1] if transposed else one) for name in names]
        sources = [s.T if transposed else s for s in sources]
        # A stacked parameter's shard reads only its own layers' tensors.
        source = _Stack(sources) if _stacked(path_tuple, config) else sources[0]
        sharding = _placement(variable, mesh, rules)
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


def _placement(variable, mesh, rules) -> jax.sharding.Sharding:
    """Where a parameter goes: sharded on `mesh` by its logical axes, else the default
    device."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    axes = variable.get_metadata()["logical_axes"]
    return partitioning.sharding_for(variable.get_value().shape, axes, mesh, rules)


def _new_adapter(path: tuple, variable, config: ModelConfig, mesh, rules) -> jax.Array:
    """A new LoRA matrix: B zero; A as `transformer.Linear` draws it (`new_lora_a`), keyed by
    the config's LoRA seed and the parameter's path."""
    shape, dtype = variable.get_value().shape, jnp.dtype(config.param_dtype)
    sharding = _placement(variable, mesh, rules)
    if path[-1] == "lora_b":
        return _adapter_program(shape, dtype, sharding, zero=True)()
    path_hash = zlib.crc32("/".join(map(str, path)).encode())
    key = jax.random.fold_in(jax.random.PRNGKey(config.lora.seed), path_hash)
    return _adapter_program(shape, dtype, sharding, zero=False)(key)


@functools.cache
def _adapter_program(shape, dtype, sharding, *, zero: bool):
    """One compiled program per adapter shape and placement (a model has a handful), not one
    per adapter: compiling each of SmolLM2's 420 took 80 s of every LoRA model's load."""
    if zero:
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return jax.jit(lambda key: new_lora_a(key, shape, dtype), out_shardings=sharding)


class _Stack:
    """Arrays [*shape] seen as one [n, *shape] array that is indexed without stacking."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __getitem__(self, idx: tuple) -> np.ndarray:
        first, rest = idx[0], tuple(idx[1:])
        return np.stack([self.arrays[i][rest] for i in range(len(self.arrays))[first]])


def _hf_tensors(model: DecoderLM, dtype, merge_lora=True) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) of every base weight; a LoRA-adapted kernel with its
    adapter merged in (W + scale * A B, computed in float32) unless not `merge_lora`."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path_tuple, variable in flat.items():
        if isinstance(variable, nnx.LoRAParam):
            continue
        names, transposed = _hf_names(path_tuple, model.config)
        array = np.asarray(jax.device_get(variable.get_value()))
        adapter = (*path_tuple[:-1], "lora_a")
        if merge_lora and path_tuple[-1] == "kernel" and adapter in flat:
            a = np.asarray(jax.device_get(flat[adapter].get_value()), np.float32)
            b = np.asarray(jax.device_get(flat[(*path_tuple[:-1], "lora_b")].get_value()))
            delta = model.config.lora.scale * np.matmul(a, b.astype(np.float32))
            array = (array.astype(np.float32) + delta).astype(array.dtype)
        if dtype is not None:
            array = array.astype(dtype)
        arrays = list(array) if _stacked(path_tuple, model.config) else [array]
        for name, a in zip(names, arrays, strict=True):
            yield name, a.T if transposed else a


def save_pretrained(
    model: DecoderLM,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = 4 << 30,
    merge_lora: bool = True,
) -> None:
    """Writes a Hugging Face folder (config.json, safetensors) that transformers loads.

    config.json is written last, so a folder with config.json holds a whole export on any
    filesystem (object stores have no atomic rename of a folder).

    Args:
      model: the model to export.
      path: folder, created if needed; local or remote (`gs://...`).
      dtype: dtype of the saved tensors; the parameters' own by default.
      max_shard_bytes: tensors go to model-0000i-of-0000n.safetensors files of at most this
        size plus model.safetensors.index.json when they do not fit in one file.
      merge_lora: a LoRA model's adapters merged into its weights (the adapted model); False
        writes the base weights alone (the adapters go to `save_peft_adapter`'s folder).
    """
    folder = _folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = to_hf_config(config)
    if dtype is not None:
        hf_config["dtype"] = np.dtype(dtype).name
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in _hf_tensors(model, dtype, merge_lora):
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
    else:
        _write_shards(folder, shards)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def _folder(path: str | os.PathLike):
    """pathlib for a local folder; epath for a remote one (pathlib makes gs:// a gs:/ folder)."""
    return epath.Path(path) if paths.is_remote(path) else pathlib.Path(path)


def _write_shards(folder, shards: list[dict[str, np.ndarray]]) -> None:
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard)
        weight_map.update({name: file for name in shard})
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


PEFT_PREFIX = "base_model.model."


def save_peft_adapter(
    model: DecoderLM,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype=None,
) -> None:
    """Writes a LoRA model's adapters as a PEFT folder (adapter_config.json and
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the base
    model in transformers.

    Tensors are PEFT's: `base_model.model.<HF module>.lora_A.weight` [r, in] (A transposed)
    and `.lora_B.weight` [out, r] (B transposed), with lora_alpha / r the scale.

    Raises:
      ValueError: the model has no adapters (`ModelConfig.lora` is None).
    """
    lora = model.config.lora
    if lora is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (config.lora None).")
    folder = _folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path_tuple, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        names, _ = _hf_names((*path_tuple[:-1], "kernel"), model.config)
        array = np.asarray(jax.device_get(variable.get_value()))
        if dtype is not None:
            array = array.astype(dtype)
        arrays = list(array) if _stacked(path_tuple, model.config) else [array]
        which = "lora_A" if path_tuple[-1] == "lora_a" else "lora_B"
        for name, a in zip(names, arrays, strict=True):
            module = name.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.{which}.weight"] = np.ascontiguousarray(a.T)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
