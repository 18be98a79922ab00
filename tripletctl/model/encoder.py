"""The embedding model: a transformers encoder, pooling, an optional MLP head and L2 normalisation.

Saved models stay usable outside tripletctl: the folder loads with plain
`transformers.AutoModel.from_pretrained` (no weight missing: the base model's pooler is kept,
frozen) and is a complete sentence-transformers model (pooling, head as Dense modules,
normalisation: see sbert.py), with a model card (card.py). `tripletctl_model.json` says how
tripletctl reads it back; folders of the previous format (head in `head.safetensors`) still load.
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from tripletctl.config.choices import POOLINGS
from tripletctl.core.errors import ModelError, TripletctlError, one_line
from tripletctl.core.files import FileRefused
from tripletctl.core.folders import check_model_folder
from tripletctl.core.jsonio import read_json
from tripletctl.data.tokenizer import load_tokenizer
from tripletctl.model import sbert, varlen
from tripletctl.model.card import CARD_FILE, Provenance, render_card
from tripletctl.model.chunking import CHUNK_OVERHEAD_TOKENS, Chunking, plan_chunks, right_padded
from tripletctl.model.compiled import CompiledOrEager

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tripletctl.config.blocks import ModelConfig

PICKLED_WEIGHTS = (
    "its weights (pytorch_model.bin) hold objects that could run code when loaded, or are damaged; "
    "refusing to load them (use safetensors weights)"
)
HEAD_FILE = "head.safetensors"  # format 1 only: format 2 keeps the head in the K_Dense modules
META_FILE = "tripletctl_model.json"
MODEL_FORMAT_VERSION = 2


class TripletEncoder(nn.Module):
    """Encoder + pooling + optional MLP head + optional L2 norm; returns one float32 row per text."""

    def __init__(
        self,
        encoder: PreTrainedModel,
        pooling: str = "mean",
        head: Sequence[int] = (),
        normalize: bool = True,
        unpadded: bool = False,
        head_module: nn.Sequential | None = None,
    ):
        """`head_module`, when given, is the head as read from a folder's Dense modules (any of their
        activations); `head` sizes are then taken from it."""
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        _freeze_pooler(encoder)
        self.pooling = pooling
        if head_module is not None:
            head = [m.out_features for m in head_module if isinstance(m, nn.Linear)]
        self.head_sizes = tuple(int(s) for s in head)
        self.head = head_module if head_module is not None else make_head(encoder.config.hidden_size, self.head_sizes)
        self.normalize = normalize
        # model.unpadded: real tokens only (varlen.py); None when off, else why not, when it cannot be
        self.unpadded_unsupported = varlen.unsupported(encoder) if unpadded else None
        self.unpadded = unpadded and self.unpadded_unsupported is None

    @property
    def embedding_dim(self) -> int:
        return self.head_sizes[-1] if self.head_sizes else int(self.encoder.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        packed = self.unpadded and right_padded(attention_mask)
        if packed:  # the real tokens back to back; the encoder's own weights, run eagerly
            hidden, lengths, cu_seqlens = varlen.encode_packed(unwrap(self.encoder), input_ids, attention_mask)
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Pooling, head and norm run outside autocast: bf16 sums over long rows and a bf16 norm
        # make distances noisy enough to flip semi-hard mining decisions. (float64 stays float64.)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
            if packed:
                pooled = varlen.pool_packed(hidden, lengths, cu_seqlens, self.pooling)
            else:
                pooled = pool(hidden, attention_mask, self.pooling)
            if self.head is not None:
                pooled = self.head(pooled)
            if self.normalize:
                pooled = nn.functional.normalize(pooled, p=2.0, dim=-1, eps=1e-12)
        return pooled


def _freeze_pooler(encoder: nn.Module) -> None:
    """Keep the base model's pooler but never train it.

    Pooling reads the hidden states, so the pooler gets no gradient: DDP rejects a parameter
    that requires one and never receives it. Kept (frozen), it is saved with the encoder, so
    `AutoModel.from_pretrained` on a saved folder finds every weight it expects.
    """
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Mean over real tokens (padding excluded), or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def make_head(hidden_size: int, sizes: Sequence[int]) -> nn.Sequential | None:
    """Linear-GELU-...-Linear; the last layer has no activation so outputs can be negative."""
    if not sizes:
        return None
    layers: list[nn.Module] = []
    previous = hidden_size
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(previous, int(size)))
        if i < len(sizes) - 1:
            layers.append(nn.GELU())
        previous = int(size)
    return nn.Sequential(*layers)


def _with_fallbacks(
    load: Callable[..., PreTrainedModel], *args: Any, attn_implementation: str = "sdpa", **kwargs: Any
) -> PreTrainedModel:
    """Ask for `attn_implementation`; drop the default SDPA request where the model class has no
    SDPA path. An attention implementation asked for by name (not the default SDPA) that cannot
    be used is an error, not a silent fallback to padded attention.

    The model keeps its pooler (see `_freeze_pooler`), exactly as `AutoModel` builds it. Every
    load goes through here: `trust_remote_code=False`, so no code from a folder runs and nothing prompts.
    """
    kwargs["trust_remote_code"] = False
    try:
        return load(*args, attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:  # this architecture has no such attention path
        if attn_implementation != "sdpa":
            message = " ".join(str(e).split())
            raise TripletctlError(
                f"model.attn_implementation '{attn_implementation}' cannot be used: {message[:300]}"
            ) from None
        return load(*args, **kwargs)


def build_model(model: ModelConfig, seed: int) -> tuple[TripletEncoder, PreTrainedTokenizerBase]:
    """Build from a curriculum's model block.

    `init: pretrained` loads hub/local weights; `init: config` draws random weights from
    config.json under `torch.manual_seed(seed)`, so the same seed gives the same model.
    """
    attention = getattr(model, "attn_implementation", "sdpa")
    check_model_folder(model.name)  # no custom code, no symlink out, bounded files: before transformers reads it
    try:  # a missing local directory or an unreachable hub name is bad input, not a crash
        if model.init == "pretrained":
            encoder = _with_fallbacks(
                AutoModel.from_pretrained, model.name, dtype=torch.float32, attn_implementation=attention
            )
        elif model.init == "config":
            config = AutoConfig.from_pretrained(model.name, trust_remote_code=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                encoder = _with_fallbacks(
                    AutoModel.from_config, config, dtype=torch.float32, attn_implementation=attention
                )
        else:
            raise ValueError(f"model.init must be 'pretrained' or 'config', got {model.init!r}")
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle: nothing ran
        raise ModelError(f"cannot load model {model.name!r} (init: {model.init}): {PICKLED_WEIGHTS}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"cannot load model {model.name!r} (init: {model.init}): {one_line(e)}") from None
    folder = Path(model.name)
    start_head = _folder_head(folder, model) if model.init == "pretrained" and folder.is_dir() else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head is random in both modes: seed it too
        triplet = TripletEncoder(
            encoder,
            pooling=model.pooling,
            head=tuple(model.head),
            normalize=model.normalize,
            unpadded=getattr(model, "unpadded", False),
            head_module=start_head,
        )
    if triplet.unpadded_unsupported is not None:
        print(
            f"warning: model.unpadded is off for {model.name}: {triplet.unpadded_unsupported}; encoding padded chunks",
            file=sys.stderr,
            flush=True,
        )
    return triplet, load_tokenizer(model.tokenizer or model.name)


def _folder_head(folder: Path, model: ModelConfig) -> nn.Sequential | None:
    """Starting from a sentence-transformers folder (tripletctl's export is one): its Pooling must be
    the curriculum's and its Dense modules are the head training continues from, so nothing of what
    the folder's model does is silently dropped or replaced."""
    if not (folder / sbert.MODULES_FILE).is_file():
        return None
    try:
        pipeline = sbert.read_pipeline(folder)
        head = sbert.build_head(folder, pipeline.dense)
    except Exception as e:
        raise ModelError(f"cannot read the sentence-transformers modules of {folder}: {one_line(e)}") from None
    if pipeline.pooling != model.pooling:
        raise ModelError(
            f"model.pooling is {model.pooling} but {folder / sbert.POOLING_DIR} pools {pipeline.pooling}: "
            f"set model.pooling: {pipeline.pooling}"
        )
    sizes = tuple(d.out_features for d in pipeline.dense)
    if head is not None and tuple(model.head) not in ((), sizes):
        raise ModelError(
            f"model.head is {list(model.head)} but {folder} has Dense layers {list(sizes)}, which training "
            f"continues from: leave model.head out or set it to {list(sizes)}"
        )
    return head


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`), `CompiledOrEager` and torch.compile (`._orig_mod`) wrappers before saving."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, CompiledOrEager)):
            model = model.module
        else:
            return model


def save_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path, provenance: Provenance | None = None
) -> None:
    """Write a folder that tripletctl, plain transformers and sentence-transformers all load.

    Encoder (safetensors, with its pooler) + tokenizer at the root, the sentence-transformers
    modules (the head's weights live in its Dense modules), tripletctl_model.json and README.md.
    `provenance` (the curriculum as run, where training stood, the held-out metrics of these
    weights) sets max_seq_length, the similarity function and the model card.
    """
    model = unwrap(model)
    assert isinstance(model, TripletEncoder), type(model)
    provenance = provenance or Provenance()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder = unwrap(model.encoder)
    encoder.config.__dict__.pop("auto_map", None)  # a saved folder never points at code (core/folders.py)
    getattr(tokenizer, "init_kwargs", {}).pop("auto_map", None)
    encoder.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    hidden_size = int(encoder.config.hidden_size)
    dense_dirs = sbert.write_modules(
        directory,
        hidden_size=hidden_size,
        pooling=model.pooling,
        head=model.head,
        normalize=model.normalize,
        max_seq_length=provenance.max_seq_length,
        similarity=provenance.distance,
    )
    meta = {
        "format_version": MODEL_FORMAT_VERSION,
        "pooling": model.pooling,
        "head": list(model.head_sizes),
        "normalize": model.normalize,
        "embedding_dim": model.embedding_dim,
        "hidden_size": hidden_size,
        "head_modules": dense_dirs,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (directory / CARD_FILE).write_text(render_card(meta, provenance), encoding="utf-8")
    for weights in directory.rglob("*.safetensors"):  # written 0600 (a temporary file), every other file per umask
        weights.chmod((directory / "config.json").stat().st_mode & 0o777)


def read_meta(directory: str | Path) -> dict:
    """tripletctl_model.json, checked: ValueError names what is wrong (FileNotFoundError if absent)."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a tripletctl model directory (no {META_FILE})")
    try:
        meta = read_json(meta_path)
    except (UnicodeDecodeError, json.JSONDecodeError, FileRefused) as e:
        raise ValueError(f"{meta_path} is damaged: {e}") from None
    missing = [k for k in ("pooling", "head", "normalize") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(missing)}")
    return meta


def load_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[TripletEncoder, PreTrainedTokenizerBase]:
    """Inverse of `save_model` (any format version); returns the model on `device`, in eval mode.

    Weights load from safetensors only (never a pickle), only from inside `directory`, and every
    failure (a truncated file, shapes that do not match config.json, mistyped metadata) is one
    ModelError naming the directory.
    """
    directory = Path(directory)
    check_model_folder(directory)  # no custom code, no symlink out, bounded files
    try:
        meta = read_meta(directory)
        pooling, head, normalize = meta["pooling"], tuple(int(s) for s in meta["head"]), bool(meta["normalize"])
        dense_dirs = [str(d) for d in (meta.get("head_modules") or [])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{directory / META_FILE} is damaged: {one_line(e)}") from None
    if any(Path(d).is_absolute() or ".." in Path(d).parts for d in dense_dirs):
        raise ModelError(
            f"{directory / META_FILE}: head_modules must name folders inside the model, got {dense_dirs!r:.200}"
        )
    try:
        encoder = _with_fallbacks(
            AutoModel.from_pretrained, str(directory), dtype=torch.float32, use_safetensors=True, local_files_only=True
        )
        if head and meta.get("format_version", 1) >= 2:  # the Dense modules, activations included
            pipeline = sbert.read_pipeline(directory)
            if [d.path for d in pipeline.dense] != dense_dirs:
                raise ValueError(f"modules.json lists Dense {[d.path for d in pipeline.dense]}, not {dense_dirs}")
            model = TripletEncoder(
                encoder, pooling=pooling, normalize=normalize, head_module=sbert.build_head(directory, pipeline.dense)
            )
            if model.head_sizes != head:
                raise ValueError(f"the Dense modules give a head of {model.head_sizes}, not {head}")
        else:
            model = TripletEncoder(encoder, pooling=pooling, head=head, normalize=normalize)
            if model.head is not None:
                model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    except Exception as e:  # SafetensorError, OSError, RuntimeError (shapes), ValueError...
        raise ModelError(
            f"the model in {directory} cannot be loaded (damaged or mismatched files): {one_line(e)}"
        ) from None
    return model.to(device).eval(), load_tokenizer(str(directory))


def load_sentence_transformers(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[TripletEncoder, PreTrainedTokenizerBase, sbert.Pipeline]:
    """Any sentence-transformers folder, its Pooling, Dense and Normalize modules read, not guessed.

    A folder whose similarity is cosine but that has no Normalize module is normalised here: cosine
    ranks exactly like Euclidean distance between unit vectors, which is what tripletctl measures.
    Weights load from safetensors only, from inside `directory`.
    """
    directory = Path(directory)
    check_model_folder(directory)
    try:
        pipeline = sbert.read_pipeline(directory)
        encoder = _with_fallbacks(
            AutoModel.from_pretrained, str(directory), dtype=torch.float32, use_safetensors=True, local_files_only=True
        )
        model = TripletEncoder(
            encoder,
            pooling=pipeline.pooling,
            normalize=pipeline.normalize or pipeline.similarity in (None, "cosine"),
            head_module=sbert.build_head(directory, pipeline.dense),
        )
    except Exception as e:  # unsupported modules, SafetensorError, OSError, shapes...
        raise ModelError(f"the sentence-transformers model in {directory} cannot be loaded: {one_line(e)}") from None
    return model.to(device).eval(), load_tokenizer(str(directory)), pipeline


def model_folder(name: str | Path) -> Path | None:
    """A local model folder (tripletctl's or sentence-transformers'), a hub name fetched into the
    hub cache, or None when `name` is a local path that is neither (a run, a checkpoint...)."""
    path = Path(name)
    if path.is_dir():
        return path if (path / META_FILE).is_file() or (path / sbert.MODULES_FILE).is_file() else None
    if path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") != 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name)))
    except Exception as e:  # offline, no such repository, gated...
        raise ModelError(f"{name} is not a local folder and cannot be fetched from the hub: {one_line(e)}") from None


def load_any_model(
    directory: Path, device: str | torch.device = "cpu"
) -> tuple[TripletEncoder, PreTrainedTokenizerBase, int | None]:
    """A `model_folder`: tripletctl's export (its own metadata) or any sentence-transformers folder;
    with the max_seq_length the folder declares (None when it declares none)."""
    if (directory / META_FILE).is_file():
        model, tokenizer = load_model(directory, device)  # a damaged folder failed there, in one line
        return model, tokenizer, sbert.declared_max_seq_length(directory)
    model, tokenizer, pipeline = load_sentence_transformers(directory, device)
    return model, tokenizer, pipeline.max_seq_length


def is_finite(model: nn.Module) -> bool:
    """True when no parameter or buffer holds NaN or inf (such weights are never kept as a best model)."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 256,
    max_length: int = 128,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """Embed `texts` → (N, D) float32 on CPU, rows in input order.

    Rows are packed as in training (`chunking.plan_chunks`): sorted by length and cut into chunks of
    at most `batch_size × max_length` padded tokens, each padded to its own longest row, so short
    texts are not padded to long ones and a chunk of short texts holds more rows. `device=None` uses
    the device the model is already on. The model's train/eval mode is restored afterwards, so the
    collapse watchdog can call this in the middle of training.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    texts = list(texts)
    if not texts:
        dim = unwrap(model).embedding_dim if isinstance(unwrap(model), TripletEncoder) else 0
        return torch.empty(0, dim, dtype=torch.float32)
    ids = tokenizer(
        texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    chunking = Chunking(
        tokens=max(1, batch_size * max_length),
        overhead_tokens=CHUNK_OVERHEAD_TOKENS.get(device.type, CHUNK_OVERHEAD_TOKENS["cpu"]),
    )
    plan = plan_chunks([len(row) for row in ids], chunking)
    was_training = model.training
    model.eval()
    out: Tensor | None = None
    try:
        for batch_rows in _batches(plan.chunks, progress):
            padded = tokenizer.pad({"input_ids": [ids[i] for i in batch_rows]}, return_tensors="pt")
            emb = model(padded["input_ids"].to(device), padded["attention_mask"].to(device))
            emb = emb.float().cpu()
            if out is None:
                out = torch.empty(len(texts), emb.shape[1], dtype=torch.float32)
            out[torch.tensor(batch_rows)] = emb
    finally:
        model.train(was_training)
    assert out is not None
    return out


def _batches(chunks: Sequence[Sequence[int]], progress: bool) -> Iterator[Sequence[int]]:
    """Yield the chunks, optionally behind a transient rich progress bar."""
    if not progress:
        yield from chunks
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("encoding", total=sum(len(c) for c in chunks))
        for rows in chunks:
            yield rows
            bar.advance(task, len(rows))
