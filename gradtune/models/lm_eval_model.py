"""gradtune's causal LMs (our GPT, a Hugging Face model, LoRA applied or not) as the lm-eval
harness's ``LM``, and the tasks ``gradtune eval --lm-eval`` accepts.

``GradtuneLM`` subclasses lm-eval's ``TemplateLM`` (the class is made on first use, ``lm_class``:
lm-eval and what it imports cost ~0.1 s, which every other command would pay at start-up).
lm-eval turns each task into requests and calls

* ``loglikelihood`` (multiple choice): the harness's own encoding of (context, continuation)
  (``TemplateLM._encode_pair``: context spaces moved to the continuation, the pair encoded whole
  and split), then ``_loglikelihood_tokens`` here, written as lm-eval's ``hf`` model does it:
  requests sorted longest first, batches of ``batch_size`` right-padded rows (no attention mask:
  with causal attention padding on the right changes no earlier position), the input
  ``(context + continuation)[-(max_length + 1):][:-1]``, log-softmax over the vocabulary, the
  continuation's log-probabilities summed, and whether each was the argmax;
* ``loglikelihood_rolling`` (perplexity): lm-eval's disjoint rolling windows of ``max_length``
  tokens, each scored as above;
* ``generate_until``: greedy (or sampled, as the request asks) decoding with our KV-cache
  generator (``models/generate.py``), cut at the first stop string; one request at a time
  (rows of different lengths would need left padding, which our generator does not take).

Tokenisation follows the ``hf`` model: the tokenizer's defaults (``add_special_tokens`` as the
tokenizer sets it), the prefix token for an empty context BOS, else EOS.

Only ``--lm-eval`` needs the package: without it ``require()`` is a one-line error.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from gradtune.datasets import HERE as DATASETS
from gradtune.models.generate import context_length, generate
from gradtune.models.gpt import GPT
from gradtune.runtime.errors import GradtuneError

AVAILABLE = importlib.util.find_spec("lm_eval") is not None  # an optional dependency (pyproject extra "eval")

TASKS = DATASETS / "lm_eval"  # the tasks gradtune ships: <name>.yaml + its JSONL
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when the model's config names no context length


def require() -> None:
    if not AVAILABLE:
        raise GradtuneError("--lm-eval needs the lm-eval package: pip install 'gradtune[eval]' (lm-eval==0.4.13)")


@functools.cache
def lm_class() -> type:
    """``GradtuneLM``: the methods below on lm-eval's ``TemplateLM``."""
    require()
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError as e:  # installed, but it or a dependency of it does not import
        raise GradtuneError(f"--lm-eval: the lm-eval package does not import: {e}") from e

    return type("GradtuneLM", (Scorer, TemplateLM), {"__module__": __name__, "__doc__": Scorer.__doc__})


class Scorer:
    """``model`` (eval mode, on ``device``) with its tokenizer: an HF tokenizer, or gradtune's
    (``encode`` / ``decode`` / ``eos_id``) for our GPT. lm-eval's ``TemplateLM`` methods come with
    ``lm_class``; ``super()`` below is ``TemplateLM``."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 8, device: str = "cpu") -> None:
        super().__init__()
        self.model, self.tok, self.batch = model.eval(), tokenizer, batch_size
        self.gpt = isinstance(model, GPT)
        self._device = torch.device(device)
        self._max_length = context_length(model) or DEFAULT_MAX_LENGTH

    # --- tokens -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tok.eos_id if self.gpt else self.tok.eos_token_id
        return int(eos) if eos is not None else 0  # a tokenizer without one: id 0 stands in

    @property
    def prefix_token_id(self) -> int:
        bos = None if self.gpt else self.tok.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        if self.gpt:
            return list(self.tok.encode(string))
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tok.encode(string, **extra))

    def tok_decode(self, ids: Any, **kwargs: Any) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.tok.decode(ids) if self.gpt else self.tok.decode(ids, **kwargs)

    # --- scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def _logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) log-softmax of the model's logits for right-padded ids (B, T)."""
        out = self.model(ids) if self.gpt else self.model(input_ids=ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return F.log_softmax(logits, dim=-1)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Any]:
        """[(sum of the continuation's log-probabilities, all its tokens the argmax)] in request
        order, for requests ((context, continuation), context ids, continuation ids)."""
        longest = max((len(r[2]) for r in requests), default=0)
        if longest > self.max_length:
            raise GradtuneError(
                f"--lm-eval: a continuation of {longest} tokens is longer than the model's context ({self.max_length})"
            )
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        res: list[Any] = [None] * len(requests)
        for start in range(0, len(order), self.batch):
            chunk = order[start : start + self.batch]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device)
            logprobs = self._logprobs(ids)  # (b, width, V)
            for i, row, lp in zip(chunk, rows, logprobs):
                cont = requests[i][2]
                lp = lp[len(row) - len(cont) : len(row)]  # (len(cont), V): the continuation's positions
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                res[i] = (float(lp.gather(-1, target[:, None]).sum()), greedy)
        return res

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (string,) in [r.args for r in requests]:
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scored))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        out = []
        eos = self.tok_decode(self.eot_token_id)
        for context, gen_kwargs in [r.args for r in requests]:
            kw = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            new = int(kw.pop("max_gen_toks"))
            ids = self.tok_encode(context)[-max(self.max_length - new, 1) :]
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            full = generate(
                self.model,
                torch.tensor([ids], dtype=torch.long, device=self.device),
                new,
                temperature=temperature,
                top_p=kw.get("top_p"),
                top_k=kw.get("top_k"),
                seed=0,
                eos_id=self.eot_token_id,
            )
            text = self.tok_decode(full[0, len(ids) :].tolist())
            out.append(postprocess_generated_text(text, until, None))
        return out


# --- tasks ------------------------------------------------------------------------------------------


def _yaml_task(path: Path) -> dict[str, Any]:
    """A task YAML as a config dict, ``dataset_kwargs.data_files`` resolved against its folder."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise GradtuneError(f"--lm-eval: {path}: unreadable task YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise GradtuneError(f"--lm-eval: {path}: not an lm-eval task (no 'task' name)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        for split, name in files.items():
            if isinstance(name, str) and not Path(name).is_absolute():
                files[split] = str((path.parent / name).resolve())
                if not Path(files[split]).is_file():
                    raise GradtuneError(f"--lm-eval: {path}: data file {name!r} not found beside it")
    return config


def shipped() -> list[str]:
    return sorted(p.stem for p in TASKS.glob("*.yaml"))


def resolve_tasks(spec: str) -> list[Any]:
    """``--lm-eval``'s comma-separated tasks as lm-eval task specs: a task gradtune ships (by
    name), a task YAML file, or a task of lm-eval's own registry (its data must be local or in
    the datasets cache: no download happens here). An unknown name is a one-line error."""
    require()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise GradtuneError("--lm-eval: give one or more task names (comma-separated)")
    out: list[Any] = []
    registry: Optional[set[str]] = None
    for name in names:
        if name in shipped():
            out.append(_yaml_task(TASKS / f"{name}.yaml"))
        elif name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise GradtuneError(f"--lm-eval: {name}: no such task file")
            out.append(_yaml_task(Path(name)))
        else:
            if registry is None:
                from lm_eval.tasks import TaskManager  # indexes every task YAML lm-eval ships (seconds)

                registry = set(TaskManager().all_tasks)
            if name not in registry:
                raise GradtuneError(
                    f"--lm-eval: unknown task {name!r} (gradtune ships {', '.join(shipped())}; "
                    f"or give a task YAML file, or one of lm-eval's task names)"
                )
            out.append(name)
    return out


def run_tasks(lm: Any, tasks: list[Any], limit: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} from lm-eval's ``simple_evaluate`` (zero-shot, as each task's
    config says; no bootstrap standard errors)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm, tasks=tasks, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR"
    )
    return {task: dict(metrics) for task, metrics in results["results"].items()}
