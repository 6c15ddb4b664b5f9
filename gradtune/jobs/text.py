"""The language-model job: text -> tokens -> windows, a GPT sized to the tokenizer, CausalLM.

The model is made by a factory (``make_model(vocab_size, cfg.gpt)``), so ``text_job`` serves any
causal LM that maps input_ids (B, T) to logits (B, T, V); ``build_text`` plugs in our GPT. Like
every builder it validates all input (text, tokenizer, sizes) before anything is written to
out_dir; the only writes are the token cache and a trained tokenizer (``text.tokenizer: train``),
both outside out_dir and safe to delete.

``data`` is one corpus (a name, file, folder, glob or list of them) or a mixture of
``{path, weight}`` sources: each source is tokenised and split on its own, and the sampler
draws windows by weight (data/mixture.py); the objective then also sums each source's tokens
(metrics ``tokens_<source>``).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gradtune.config import Config, GPTSection
from gradtune.data import bpe, corpus, text
from gradtune.data import tokenizer as tokenizers
from gradtune.data.fingerprint import shard_digest
from gradtune.data.mixture import MixtureWindows, SourceTokens
from gradtune.data.plain_tokenizer import PlainTokenizer
from gradtune.data.token_bytes import token_bytes
from gradtune.jobs import preference
from gradtune.jobs.job import Job, eval_chunk, load_init, metrics_for
from gradtune.models.gpt import GPT, GPTConfig
from gradtune.objectives.causal_lm import CausalLM
from gradtune.optim.groups import decay_groups
from gradtune.runtime.atomic import atomic_path
from gradtune.runtime.errors import GradtuneError

# (vocab_size, cfg.gpt) -> a causal LM mapping input_ids (B, T) to logits (B, T, vocab_size).
ModelFactory = Callable[[int, GPTSection], nn.Module]


def gpt(vocab_size: int, section: GPTSection) -> GPT:
    """GPT(GPTConfig) from every cfg.gpt field GPTConfig also has, plus vocab_size; an unset
    qk_norm is the family's (on for llama: Qwen3's block, which export --hf / --gguf write)."""
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    given = {k: v for k, v in dataclasses.asdict(section).items() if k in names}
    if "qk_norm" in given and given["qk_norm"] is None:
        given["qk_norm"] = section.family == "llama"
    return GPT(GPTConfig(vocab_size=vocab_size, **given))


def is_mixture(data: Any) -> bool:
    return isinstance(data, list) and all(isinstance(d, dict) for d in data)


def tokenizer_spec(cfg: Config) -> str:
    """``cfg.text.tokenizer``, or for ``train`` the path of a BPE trained on the run's training
    text (cached)."""
    if cfg.text.tokenizer != "train":
        return cfg.text.tokenizer
    # Trained on each source's training text only: the validation split is each one's tail.
    sources = (
        [corpus.shards_of(d["path"])[1] for d in cfg.data] if is_mixture(cfg.data) else [corpus.shards_of(cfg.data)[1]]
    )
    digests = [shard_digest(s.path) for group in sources for s in group]
    share = bpe.train_share(cfg.val_fraction)
    return str(bpe.cached(sources, digests, cfg.text.vocab_size, cfg.text.field, share))


def source_names(paths: list[Any]) -> list[str]:
    """A short, unique name per mixture source (its file or folder stem): metric names."""
    names: list[str] = []
    for i, p in enumerate(paths):
        name = re.sub(r"[^A-Za-z0-9_]+", "_", corpus.stem(str(p[0] if isinstance(p, list) else p))) or "src"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def validation_windows(cfg: Config, spec: str) -> Any:
    """The validation windows a run was evaluated on (one corpus or a mixture's sources, its
    ``text.field``), under the tokenizer ``spec``; None when it kept no validation split."""
    return _windows(cfg, spec)[1]


def _windows(cfg: Config, spec: str) -> tuple[Any, Any, text.TokenFile, dict[str, Any], list[text.TokenFile]]:
    """(train, val, one TokenFile, info, the token files this process built) of the data: one
    corpus, or a mixture's sources."""
    t = cfg.text
    if not is_mixture(cfg.data):
        tf = text.tokenize(cfg.data, spec, field=t.field, workers=t.workers)
        train, val = text.split(tf, cfg.gpt.block_size, cfg.val_fraction)
        return train, val, tf, {}, [tf] if not tf.cache_hit else []
    paths = [d["path"] for d in cfg.data]
    names = source_names(paths)
    tfs = [text.tokenize(p, spec, field=t.field, workers=t.workers) for p in paths]
    splits = [text.split(tf, cfg.gpt.block_size, cfg.val_fraction) for tf in tfs]
    weights = [float(d.get("weight", 1.0)) for d in cfg.data]
    train = MixtureWindows([s[0] for s in splits], names, weights)
    vals = [s[1] for s in splits]
    val = MixtureWindows(vals, names, weights) if all(v is not None for v in vals) else None
    sources = [
        {"name": n, "path": str(p), "weight": w, "n_tokens": tf.n_tokens, "train_windows": len(s[0])}
        for n, p, w, tf, s in zip(names, paths, weights, tfs, splits)
    ]
    built = [tf for tf in tfs if not tf.cache_hit]
    return train, val, tfs[0], {"sources": sources, "n_tokens": sum(tf.n_tokens for tf in tfs)}, built


def text_job(cfg: Config, make_model: ModelFactory) -> Job:
    """The Job for training ``make_model(vocab, cfg.gpt)`` on ``cfg.data`` with ``cfg.text.tokenizer``."""
    if cfg.loss not in ("auto", "cross_entropy"):
        raise GradtuneError(f"config: loss '{cfg.loss}' does not fit a language model; use cross_entropy")
    train, val, tf, extra, built = _windows(cfg, tokenizer_spec(cfg))
    for f in built:  # after every check passed: a refused input stays one line
        print(f.note(), file=sys.stderr, flush=True)
    vocab = tf.tokenizer.vocab_size
    torch.manual_seed(cfg.seed)  # the model's random init is part of the seeded run
    model = make_model(vocab, cfg.gpt)
    if cfg.dtype == "float64":
        model = model.to(torch.float64)
    if cfg.init != "random":
        load_init(model, cfg.init)
    info: dict[str, Any] = {
        "data": tf.source if not extra else "mixture",
        "task": "lm",
        "loss": "cross_entropy",
        "tokenizer": tf.tokenizer.name,
        "tokenizer_file": str(tf.tokenizer_path),
        "vocab_size": vocab,
        "eos_id": tf.tokenizer.eos_id,
        "block_size": cfg.gpt.block_size,
        "n_tokens": tf.n_tokens,
        "n_train_tokens": train.n_tokens,
        "n_val_tokens": val.n_tokens if val is not None else 0,
        "train_windows": len(train),
        "val_windows": len(val) if val is not None else 0,
        "token_cache": str(tf.path),
        "token_cache_hit": tf.cache_hit,
        "tokenize_s": round(tf.seconds, 4),
        "text_bytes": tf.meta.get("bytes"),  # UTF-8 bytes of the text: loss per byte = loss * tokens / bytes
        "documents": tf.meta.get("docs"),
        **extra,
    }
    if hasattr(model, "flops_per_token"):  # our GPT; a stand-in model may not count its FLOPs
        info["flops_per_token"] = model.flops_per_token()
        info["n_params"] = model.num_params()
    lm = lm_objective(cfg, tf.tokenizer)
    objective: Any = SourceTokens(lm, [s["name"] for s in extra["sources"]]) if extra else lm
    job = Job(
        model,
        objective,
        train,
        val,
        "lm",
        info,
        param_groups=decay_groups(model, cfg.weight_decay),
        eval_chunk=eval_chunk(cfg, cheap_rows=False),
        metrics=(*metrics_for("lm"), "nats_per_byte") if lm.token_bytes is not None else (),
    )
    job.save_extra = lambda out_dir: save_tokenizer(job, out_dir)
    return job


def lm_objective(cfg: Config, tokenizer: tokenizers.Tokenizer) -> CausalLM:
    """The next-token objective; it also sums the predicted text's bytes (a loss per byte, the
    figure that compares tokenizers) unless each token is a byte already."""
    table = None if isinstance(tokenizer, tokenizers.ByteTokenizer) else token_bytes(tokenizer)
    return CausalLM(cfg.label_smoothing, token_bytes=table)


def build_text(cfg: Config) -> Job:
    """BUILDERS["gpt"]: a GPT trained from scratch on text, or (``task: preference``) a trained
    GPT tuned on preference pairs."""
    if cfg.task == "preference":
        return preference_job(cfg)
    return text_job(cfg, gpt)


def gpt_base(cfg: Config, vocab_size: int) -> GPT:
    """The GPT of ``cfg.gpt`` with the weights of ``cfg.init``, in ``cfg.dtype``."""
    model = gpt(vocab_size, cfg.gpt)
    if cfg.dtype == "float64":
        model = model.to(torch.float64)
    load_init(model, cfg.init)
    return model


def preference_job(cfg: Config) -> Job:
    """DPO and family on our GPT: ``init`` = a trained GPT's model.safetensors (the policy's
    start and the reference), ``text.tokenizer`` = its tokenizer.json, ``gpt.*`` its shape.
    Pairs are rendered without a chat template: prompt tokens, response tokens, end token."""
    if cfg.init == "random" or cfg.text.tokenizer in ("byte", "char"):
        raise GradtuneError(
            "config: task 'preference' with model gpt tunes a trained GPT: set init=<run>/model.safetensors and "
            "text.tokenizer=<run>/tokenizer.json (and the run's gpt.* shape)"
        )
    if cfg.method != "full":
        raise GradtuneError(f"config: model gpt fine-tunes with method=full only, got method={cfg.method}")
    tok = tokenizers.load(cfg.text.tokenizer)
    preference.check(cfg)
    train, val = preference.train_val(cfg, PlainTokenizer(tok))
    model = gpt_base(cfg, tok.vocab_size)
    info: dict[str, Any] = {
        "data": cfg.data,
        "task": "preference",
        "tokenizer_file": str(Path(cfg.text.tokenizer).resolve()),
        "vocab_size": tok.vocab_size,
        "n_train": len(train),
        "n_val": len(val) if val is not None else 0,
    }
    objective = preference.objective(cfg, model, train, val)  # the reference: precomputed, untouched weights
    job = Job(model, objective, train, val, "preference", info, param_groups=decay_groups(model, cfg.weight_decay))
    job.save_extra = lambda out_dir: save_tokenizer(job, out_dir)
    return job


def save_tokenizer(job: Job, out_dir: Path | str) -> Path:
    """Copy the tokenizer the job trained with to ``out_dir/tokenizer.json``: generation and
    evaluation must decode exactly as training encoded."""
    target = Path(out_dir) / "tokenizer.json"
    with atomic_path(target) as tmp:
        tmp.write_bytes(Path(job.info["tokenizer_file"]).read_bytes())
    return target
