"""The sentence-transformers side of a saved model folder, written without sentence-transformers.

A folder that only holds a transformers encoder loads in `SentenceTransformer(path)` without an
error and silently gives the wrong embeddings (mean pooling, no head, no normalisation). So every
model folder also describes the whole pipeline in sentence-transformers' own layout:

    modules.json                       Transformer (the folder root) -> Pooling -> Dense... -> Normalize
    sentence_bert_config.json          max_seq_length (= data.max_length)
    config_sentence_transformers.json  similarity_fn_name (the training distance)
    1_Pooling/config.json              mean or cls
    K_Dense/config.json, model.safetensors   one per head layer; activation as an import path
    K_Normalize/config.json            when the model normalises

These are the long-standing file names and keys (`sentence_transformers.models.*`), which every
sentence-transformers release from 2.x to today reads; they are small JSON files and safetensors,
so tripletctl needs no sentence-transformers at run time. The Dense weights are the head's own
(tripletctl's loader reads them back from here: one copy, no drift between the two views).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tripletctl.core.files import FileRefused
from tripletctl.core.jsonio import read_json

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
POOLING_DIR = "1_Pooling"
WEIGHTS_FILE = "model.safetensors"
IDENTITY = "torch.nn.modules.linear.Identity"
# Declared, not read from the installed package: the release whose layout these files follow.
FORMAT_SENTENCE_TRANSFORMERS_VERSION = "3.0.0"

# Training distance -> sentence-transformers similarity_fn_name. Squared euclidean ranks exactly
# like euclidean, and sentence-transformers has no squared variant.
SIMILARITY = {"euclidean": "euclidean", "squared-euclidean": "euclidean"}


def activation_path(module: nn.Module) -> str:
    """The import path sentence-transformers re-instantiates with no arguments, so the module must
    equal its default construction (GELU() is exact GELU; GELU(approximate='tanh') is not)."""
    cls = type(module)
    if repr(cls()) != repr(module):
        raise ValueError(
            f"head activation {module!r} differs from {cls.__name__}() and cannot be "
            "expressed as a sentence-transformers Dense activation_function"
        )
    return f"{cls.__module__}.{cls.__qualname__}"


def head_layers(head: nn.Sequential | None) -> list[tuple[nn.Linear, str]]:
    """Each Linear of the head with the activation that follows it (Identity for the last)."""
    if head is None:
        return []
    modules = list(head)
    layers = []
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            following = modules[i + 1] if i + 1 < len(modules) else None
            is_activation = following is not None and not isinstance(following, nn.Linear)
            layers.append((module, activation_path(following) if is_activation else IDENTITY))
    return layers


def write_modules(
    directory: Path,
    *,
    hidden_size: int,
    pooling: str,
    head: nn.Sequential | None,
    normalize: bool,
    max_seq_length: int,
    similarity: str,
) -> list[str]:
    """Write every sentence-transformers file beside the encoder; return the Dense directories."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    _write_json(directory / TRANSFORMER_CONFIG_FILE, {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    _write_json(
        directory / POOLING_DIR / "config.json",
        {
            "word_embedding_dimension": int(hidden_size),
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    dense_dirs = [_write_dense(directory, modules, linear, activation) for linear, activation in head_layers(head)]
    if normalize:
        index = len(modules)
        name = f"{index}_Normalize"
        _write_json(directory / name / "config.json", {})  # a file, so the folder survives git / hf upload
        modules.append(
            {"idx": index, "name": str(index), "path": name, "type": "sentence_transformers.models.Normalize"}
        )
    _write_json(directory / MODULES_FILE, modules)
    _write_json(
        directory / ST_CONFIG_FILE,
        {
            "__version__": {
                "sentence_transformers": FORMAT_SENTENCE_TRANSFORMERS_VERSION,
                "transformers": _version("transformers"),
                "pytorch": torch.__version__,
            },
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": SIMILARITY.get(similarity, "euclidean"),
        },
    )
    return dense_dirs


def _write_dense(directory: Path, modules: list[dict], linear: nn.Linear, activation: str) -> str:
    """One Linear of the head as the next Dense module (its config and safetensors weights), added to
    `modules`; returns its directory name."""
    index = len(modules)
    name = f"{index}_Dense"
    _write_json(
        directory / name / "config.json",
        {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "bias": linear.bias is not None,
            "activation_function": activation,
        },
    )
    state = {f"linear.{k}": v.detach().contiguous().cpu() for k, v in linear.state_dict().items()}
    save_file(state, str(directory / name / WEIGHTS_FILE), metadata={"format": "pt"})
    modules.append({"idx": index, "name": str(index), "path": name, "type": "sentence_transformers.models.Dense"})
    return name


def check_modules(directory: Path) -> None:
    """Raise ValueError when modules.json or a module it names is missing or unreadable."""
    modules = _read_json(directory / MODULES_FILE)
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{directory / MODULES_FILE} lists no modules")
    _read_json(directory / ST_CONFIG_FILE)
    _read_json(directory / TRANSFORMER_CONFIG_FILE)
    for module in modules:
        path = module.get("path") if isinstance(module, dict) else None
        if path:
            _read_json(directory / path / "config.json")
            if module.get("type", "").endswith(".Dense") and not (directory / path / WEIGHTS_FILE).is_file():
                raise ValueError(f"{directory / path} has no {WEIGHTS_FILE}")


# Dense activations read back by name from an allow-list: a folder never names code to import.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    IDENTITY: nn.Identity,
    **{f"torch.nn.modules.activation.{cls.__name__}": cls for cls in (nn.Tanh, nn.GELU, nn.ReLU, nn.Sigmoid, nn.SiLU)},
}


@dataclass(frozen=True)
class Dense:
    path: str
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class Pipeline:
    """What a sentence-transformers folder's modules.json says the model does after the encoder."""

    pooling: str
    dense: tuple[Dense, ...]
    normalize: bool
    max_seq_length: int | None  # None: the folder does not say
    similarity: str | None  # similarity_fn_name (cosine, dot, euclidean...), None when absent


def read_pipeline(directory: Path) -> Pipeline:
    """Read modules.json and its modules' configs (any release's class paths: matched by class name).

    Raises ValueError naming the file for a module tripletctl cannot reproduce exactly (max or
    last-token pooling, an encoder not at the folder root, a custom module), instead of guessing.
    """
    modules = _read_json(directory / MODULES_FILE)
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{directory / MODULES_FILE} lists no modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[0] != "Transformer" or modules[0].get("path", "") not in ("", "."):
        raise ValueError(f"{directory / MODULES_FILE}: the first module must be a Transformer at the folder root")
    pooling, dense, normalize = None, [], False
    for module, kind in zip(modules[1:], kinds[1:]):
        path = str(module.get("path", ""))
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise ValueError(f"{directory / MODULES_FILE}: module path {path!r} leaves the folder")
        if kind == "Pooling" and pooling is None and not dense:
            pooling = _pooling_mode(directory / path / "config.json")
        elif kind == "Dense" and pooling is not None and not normalize:
            dense.append(_dense(directory, path))
        elif kind == "Normalize" and not normalize:
            normalize = True
        else:
            raise ValueError(f"{directory / MODULES_FILE}: module {module.get('type')!r} here is not supported")
    if pooling is None:
        raise ValueError(f"{directory / MODULES_FILE} has no Pooling module")
    config = _read_json(directory / ST_CONFIG_FILE) if (directory / ST_CONFIG_FILE).is_file() else {}
    similarity = config.get("similarity_fn_name") if isinstance(config, dict) else None
    return Pipeline(
        pooling=pooling,
        dense=tuple(dense),
        normalize=normalize,
        max_seq_length=declared_max_seq_length(directory),
        similarity=similarity if isinstance(similarity, str) else None,
    )


def declared_max_seq_length(directory: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length (None when the file or the key is absent: recent
    sentence-transformers releases leave it to the tokenizer)."""
    path = directory / TRANSFORMER_CONFIG_FILE
    settings = _read_json(path) if path.is_file() else {}
    length = settings.get("max_seq_length") if isinstance(settings, dict) else None
    return length if isinstance(length, int) and length > 0 else None


def _pooling_mode(path: Path) -> str:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    mode = config.get("pooling_mode")  # sentence-transformers 5+; older releases: one flag per mode
    if mode is None:
        flags = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
        mode = {"mean_tokens": "mean", "cls_token": "cls"}.get(flags[0], flags[0]) if len(flags) == 1 else flags
    if mode not in ("mean", "cls"):
        raise ValueError(f"{path}: pooling {mode!r} is not supported (tripletctl pools mean or cls)")
    return str(mode)


def _dense(directory: Path, path: str) -> Dense:
    config = _read_json(directory / path / "config.json")
    try:
        dense = Dense(
            path,
            int(config["in_features"]),
            int(config["out_features"]),
            bool(config.get("bias", True)),
            str(config.get("activation_function", "torch.nn.modules.activation.Tanh")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / path / 'config.json'} is not a Dense config: {e}") from None
    if dense.activation not in ACTIVATIONS:
        raise ValueError(f"{directory / path / 'config.json'}: activation {dense.activation!r} is not supported")
    return dense


def build_head(directory: Path, dense: tuple[Dense, ...]) -> nn.Sequential | None:
    """The Dense modules as one nn.Sequential (Linear, activation, ...), weights from safetensors."""
    if not dense:
        return None
    layers: list[nn.Module] = []
    for spec in dense:
        linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        weights = load_file(str(directory / spec.path / WEIGHTS_FILE))
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
        layers.append(linear)
        if spec.activation != IDENTITY:
            layers.append(ACTIVATIONS[spec.activation]())
    return nn.Sequential(*layers)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _read_json(path: Path):
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, FileRefused) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None


def _write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
