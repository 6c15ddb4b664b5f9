"""An Ollama ``Modelfile`` for an exported GGUF file: ``ollama create NAME -f Modelfile``.

    text = modelfile(vocab, "tuned.gguf")   # FROM ./tuned.gguf, TEMPLATE, SYSTEM, PARAMETER stop

Ollama formats a chat with a Go template, not the tokenizer's Jinja chat template, so the
template is recognised rather than translated (Jinja has no general Go-template equivalent):
  * ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``: SmolLM2, Qwen): Ollama's ChatML
    template; a default system prompt the Jinja template writes when the chat has none
    (SmolLM2's) becomes ``SYSTEM``;
  * no chat template (a plain language model): ``{{ .Prompt }}``, the text continued as given;
  * any other template: no TEMPLATE line, and a comment saying so: Ollama then picks a template
    from the file's own ``tokenizer.chat_template`` where it knows it.
Stops: the end-of-text token, and ``<|im_end|>`` / ``<|im_start|>`` for ChatML (a model that
runs on past its turn would otherwise write the user's next turn too).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from gradtune.runtime.errors import GradtuneError

CHATML = (
    "{{- if .Messages }}\n"
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\n'
    '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
    "{{- end }}\n"
    "{{- else }}\n"
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    "{{- if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    "{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"
)
# the default system turn a ChatML Jinja template writes as a literal: '<|im_start|>system\n...<|im_end|>'
# (a newline, or the two characters \n of an escape)
DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^{}]+?)<\|im_end\|>")


def _key(vocab: Any, name: str) -> Optional[Any]:
    return next((value for key, value, *_ in vocab.extra if key == name), None)


def _unescape(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), literal)


def _quoted(text: str) -> str:
    """A Modelfile string: triple quotes hold newlines and quotes; one that holds triple quotes
    itself cannot be written, nor can it come from a chat template gradtune recognises."""
    if '"""' in text:
        raise GradtuneError(f"--ollama: cannot write {text[:40]!r} in a Modelfile (it holds three double quotes)")
    return f'"""{text}"""'


def _string(text: str) -> str:
    return _quoted(text) if '"' in text or "\n" in text else f'"{text}"'


def modelfile(vocab: Any, gguf_name: str) -> str:
    """The Modelfile text for ``gguf_name`` (a file in the same folder) with the tokenizer
    ``vocab`` (a ``gguf_export.Vocab``: its ``tokenizer.*`` keys and tokens)."""
    template = _key(vocab, "tokenizer.chat_template")
    eos = _key(vocab, "tokenizer.ggml.eos_token_id")
    lines = [f"FROM ./{gguf_name}"]
    stops = [vocab.tokens[int(eos)]] if eos is not None and int(eos) < len(vocab.tokens) else []
    if not template:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f"TEMPLATE {_quoted(CHATML)}")
        system = DEFAULT_SYSTEM.search(template)
        if system:  # the Jinja string literal's escapes (\n, \') as the characters
            lines.append(f"SYSTEM {_quoted(_unescape(system.group(1)))}")
        stops += ["<|im_end|>", "<|im_start|>"]
    else:
        lines.append("# the chat template is not ChatML: Ollama picks one from the file's tokenizer.chat_template")
    lines += [f"PARAMETER stop {_string(s)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
