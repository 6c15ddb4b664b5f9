"""``gradtune export RUN``: a run as a PEFT adapter, a merged HF folder, a HF folder of a GPT
pretrained here and/or a GGUF file.

    gradtune export runs/lora --adapter out/adapter     # PEFT: PeftModel.from_pretrained(base, dir)
    gradtune export runs/lora --merged out/merged       # plain transformers folder (+ head files)
    gradtune export runs/gpt --hf out/gpt-hf            # a GPT run: LlamaForCausalLM / GPT2LMHeadModel
    gradtune export runs/lora --gguf out/m.gguf --type q8_0   # llama.cpp: llama-cli -m out/m.gguf
                                                  # (f32 f16 bf16 q8_0 q6_k q5_k_m q4_k_m q4_0 ...)
    gradtune export runs/lora --gguf out/m.gguf --ollama      # + out/Modelfile: ollama create m -f out/Modelfile

Each destination folder must be new or empty and overlap neither the run nor its base model:
all are checked before any is written (an export over the run's model.safetensors or the
pretrained folder it came from would destroy the input). A GGUF file must end in .gguf
and lie outside the run and the base model's folder; an existing one is replaced only if gradtune
wrote it (or with --overwrite). GGUF export takes Llama-family runs (a
fine-tuned HF Llama such as SmolLM2, or our GPT with gpt.family llama) whose tokenizer llama.cpp
can express: a GGUF base's tokenizer is copied from it, else a byte-level BPE tokenizer.json is
converted; gradtune's byte and char tokenizers are refused.

A run trained with ``log_to: [mlflow]`` also gets what was exported as artifacts of its MLflow run
(``export/hf``, ``export/merged``, ``export/adapter``, ``export/gguf``), said in one line; without
the mlflow package the export says nothing of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradtune.config import load_config
from gradtune.data.tokenizer import HFTokenizer
from gradtune.finetune import export, gguf_export, gguf_types, gpt_export_refusals, gpt_hf_export, ollama_modelfile
from gradtune.jobs.reload import Run, load_run, run_folder
from gradtune.models import hf
from gradtune.runtime import outdir, outfile
from gradtune.runtime.errors import GradtuneError
from gradtune.telemetry import mlflow_sink

HELP = "write a run as a PEFT adapter, a merged HF folder, a HF folder of a GPT run and/or a GGUF file (llama.cpp)"


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a fine-tuning run's out_dir (or a GPT run's, for --hf and --gguf)")
    p.add_argument("--adapter", metavar="OUT", help="write the LoRA factors as a PEFT adapter folder")
    p.add_argument("--merged", metavar="OUT", help="write the model with updates folded in, as a HF folder")
    p.add_argument(
        "--hf",
        metavar="OUT",
        help="write a GPT run (model=gpt) as a transformers folder with its tokenizer: "
        "LlamaForCausalLM (gpt.family llama) or GPT2LMHeadModel (gpt2)",
    )
    p.add_argument(
        "--gguf",
        metavar="OUT.gguf",
        help="write the model (updates folded in) and its tokenizer "
        "as one GGUF file for llama.cpp; Llama-family models only",
    )
    p.add_argument(
        "--ollama",
        action="store_true",
        help="with --gguf: also write an Ollama Modelfile beside it (FROM, the chat TEMPLATE, stop tokens): "
        "ollama create NAME -f DIR/Modelfile",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --gguf file (or Modelfile) gradtune did not write"
    )
    p.add_argument(
        "--type",
        default=None,
        help="GGUF weight type: f32 (exact), f16 (default, half the size), bf16, q8_0 (8-bit blocks), "
        "the K-quant mixes q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s (llama-quantize's), or q5_1, q5_0, q4_1, q4_0 "
        "(5/4-bit blocks); the output projection is Q6_K in the 4/5-bit types; norm weights stay f32",
    )


def _check_gguf_dest(args: argparse.Namespace, inputs: list) -> Path:
    """A new .gguf file outside the run and the base model's folder; nothing is written."""
    out = Path(args.gguf)
    if out.suffix != ".gguf":
        raise GradtuneError(f"--gguf {args.gguf}: give a file name ending in .gguf")
    target = outfile.check(out, args.overwrite, "export: --gguf")  # a file of the user's: refused
    for item in inputs:
        folder = Path(item).resolve()
        folder = folder.parent if folder.is_file() else folder
        if target.is_relative_to(folder):
            raise GradtuneError(f"--gguf {args.gguf}: inside the input {item}; write it outside the run and the model")
    return out


def _vocab(r: Run) -> gguf_export.Vocab:
    """The run's tokenizer as GGUF metadata: a GGUF base's copied, else converted."""
    if r.kind == "gpt":
        if not isinstance(r.tokenizer, HFTokenizer):
            raise GradtuneError(
                f"{r.folder}: trained with gradtune's {r.tokenizer.name} tokenizer, which llama.cpp "
                f"cannot express as a vocabulary; GGUF export needs text.tokenizer=<a byte-level "
                f"BPE tokenizer.json>"
            )
        eos = {"eos": r.tokenizer.eos_id} if r.tokenizer.eos_id is not None else {}
        template = r.tokenizer.chat_template  # ChatML where `tokenizer train` made its markers
        return gguf_export.vocab_from_tokenizer_json(r.folder / "tokenizer.json", eos, chat_template=template)
    folder, gguf_name = hf.resolve(r.cfg.model)
    if gguf_name:
        return gguf_export.vocab_from_gguf(folder / gguf_name)
    return gguf_export.vocab_from_hf_folder(r.folder / "tokenizer")


def _to_mlflow(r: Run, exported: list[tuple[str, Path]]) -> None:
    """A run logged to MLflow (``log_to: [mlflow]``, its run in summary.json) gets what was just
    exported as artifacts of that same MLflow run, said in one line; without mlflow, nothing."""
    info = r.info.get("trackers", {}).get("mlflow")
    if isinstance(info, dict) and info.get("run_id") and info.get("tracking_uri"):
        line = mlflow_sink.log_export(info, exported)
        if line:
            print(line)


def _write_gguf(r: Run, out: Path, qtype: str, model_file: Path | None) -> None:
    """The GGUF file, then its Modelfile (``model_file``) when asked; both refusals come first."""
    if r.kind == "gpt" and r.cfg.gpt.family != "llama":
        raise GradtuneError(
            f"{r.folder}: GGUF export writes Llama-family models; this GPT run has gpt.family: {r.cfg.gpt.family}"
        )
    if r.kind == "gpt":  # before the tokenizer's refusals: the model is what cannot be written at all
        gpt_export_refusals.refuse_unexpressible(r.model.config, "GGUF export", "llama.cpp's llama architecture")
    vocab = _vocab(r)
    text = ollama_modelfile.modelfile(vocab, out.name) if model_file is not None else ""
    with outfile.writing(out) as tmp:  # staged: an existing export is replaced in one rename
        gguf_export.export_gguf(r.model, vocab, tmp, qtype, name=run_folder(r.folder).resolve().name)
    print(f"gguf: {out} ({qtype}; llama.cpp: llama-cli -m {out})")
    if model_file is not None:
        outfile.write(model_file, text)
        print(f"ollama: {model_file} (ollama create NAME -f {model_file})")


def run(args: argparse.Namespace) -> int:
    if not args.adapter and not args.merged and not args.hf and not args.gguf:
        raise GradtuneError("export: give --adapter OUT, --merged OUT, --hf OUT and/or --gguf OUT.gguf")
    if args.type and not args.gguf:
        raise GradtuneError("export: --type is the GGUF weight type; give --gguf OUT.gguf with it")
    if args.ollama and not args.gguf:
        raise GradtuneError("export: --ollama writes a Modelfile beside the GGUF file; give --gguf OUT.gguf with it")
    qtype = gguf_types.check_type(args.type, "export: --type") if args.type else "f16"
    run_dir = run_folder(Path(args.run))
    base = load_config(str(run_dir / "config.yaml")).model  # a path for fine-tuning runs, a name for others
    inputs = [run_dir, args.run] + ([base] if Path(base).exists() else [])  # the run (or checkpoint), its base
    gguf_out = _check_gguf_dest(args, inputs) if args.gguf else None
    model_file = gguf_out.parent / "Modelfile" if gguf_out is not None and args.ollama else None
    if model_file is not None:  # beside the .gguf, which lies outside the inputs
        outfile.check(model_file, args.overwrite, "export: --ollama")
    dests = [d for d in (args.adapter, args.merged, args.hf) if d]
    if len({Path(d).resolve() for d in dests}) < len(dests):
        raise GradtuneError("export: two of --adapter, --merged and --hf are the same folder; give one each")
    for dest in dests:
        outdir.check_dest(dest, inputs)
        if gguf_out is not None and gguf_out.resolve().is_relative_to(Path(dest).resolve()):
            raise GradtuneError(f"--gguf {args.gguf}: inside the export folder {dest}; write it beside, not in it")
    r = load_run(args.run)
    if (args.adapter or args.merged) and r.kind != "pretrained":
        hint = "; --hf writes it as a transformers folder" if r.kind == "gpt" else ""
        raise GradtuneError(
            f"{args.run}: --adapter/--merged write fine-tuned pretrained models; this run trained "
            f"model={r.cfg.model} (its weights are {r.folder / 'model.safetensors'}){hint}"
        )
    if args.hf and r.kind != "gpt":
        hint = "; --merged writes a fine-tuned pretrained model" if r.kind == "pretrained" else ""
        raise GradtuneError(f"{args.run}: --hf writes GPT runs (model=gpt); this run trained model={r.cfg.model}{hint}")
    if args.adapter and "lora" not in r.cfg.method.split("+"):
        raise GradtuneError(
            f"{args.run}: --adapter writes LoRA factors (a PEFT adapter) and this run trained "
            f"method={r.cfg.method}; --merged writes its weights as a transformers folder"
        )
    if gguf_out is not None and r.kind not in ("gpt", "pretrained"):
        raise GradtuneError(f"{args.run}: GGUF export writes language models; this run trained model={r.cfg.model}")
    if args.hf:  # its refusals (shape, tokenizer) come before the folder exists
        gpt_hf_export.check(r.model, r.tokenizer)
    if gguf_out is not None:  # first: it refuses more runs than the others, before they write
        _write_gguf(r, gguf_out, qtype, model_file)
    if args.hf:
        gpt_hf_export.export_gpt_hf(r.model, r.tokenizer, args.hf, inputs)
        print(f"hf: {args.hf} (transformers.AutoModelForCausalLM.from_pretrained('{args.hf}'), AutoTokenizer too)")
    if args.adapter:
        export.save_adapter(r.model, args.adapter, str(Path(r.cfg.model).resolve()))
        print(f"adapter: {args.adapter} (peft.PeftModel.from_pretrained(base, '{args.adapter}'))")
    if args.merged:
        export.save_merged(r.model, args.merged, r.tokenizer)
        print(f"merged: {args.merged} (transformers.AutoModel*.from_pretrained('{args.merged}'))")
    written = [("gguf", gguf_out), ("gguf", model_file), ("hf", args.hf), ("adapter", args.adapter)]
    _to_mlflow(r, [(kind, Path(p)) for kind, p in [*written, ("merged", args.merged)] if p])
    return 0
