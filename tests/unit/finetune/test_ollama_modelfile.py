"""The Ollama Modelfile beside a GGUF export: FROM the file, ChatML's Go template (balanced, the
default system prompt of the Jinja template as SYSTEM), the end tokens as stops."""

from __future__ import annotations

import re

import pytest

from gradtune.finetune.gguf_export import Vocab
from gradtune.finetune.ollama_modelfile import CHATML, modelfile
from gradtune.runtime.errors import GradtuneError

gguf = pytest.importorskip("gguf")
SMOLLM2 = (  # SmolLM2-Instruct's chat template, as its GGUF file holds it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocab(template: str | None, eos: int | None = 0) -> Vocab:
    t = gguf.GGUFValueType
    extra = [("tokenizer.ggml.eos_token_id", eos, t.UINT32, None)] if eos is not None else []
    extra += [("tokenizer.chat_template", template, t.STRING, None)] if template else []
    return Vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"], [3, 3, 3, 1], None, extra)


def test_chatml_gets_ollamas_template_the_default_system_prompt_and_stops():
    text = modelfile(vocab(SMOLLM2), "tuned.gguf")
    assert text.startswith("FROM ./tuned.gguf\n")
    assert f'TEMPLATE """{CHATML}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    # the Go template's blocks close: every if/range has its end
    actions = re.findall(r"\{\{-?\s*(if|range|end|else)\b", CHATML)
    assert actions.count("if") + actions.count("range") == actions.count("end") == 8
    # the escaped form of the same literal (a template read from tokenizer_config.json as raw text)
    escaped = SMOLLM2.replace("\n", "\\n")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile(vocab(escaped, eos=2), "m.gguf")
    assert modelfile(vocab(escaped, eos=2), "m.gguf").count("PARAMETER stop") == 2  # eos <|im_end|> once


def test_without_a_chat_template_the_prompt_is_continued_as_given():
    text = modelfile(vocab(None), "m.gguf")
    assert text == 'FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|endoftext|>"\n'
    assert "PARAMETER" not in modelfile(vocab(None, eos=None), "m.gguf")


def test_another_template_is_left_to_ollama_with_a_comment():
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"
    text = modelfile(vocab(llama3), "m.gguf")
    assert "TEMPLATE" not in text and "# the chat template is not ChatML" in text


def test_a_system_prompt_modelfile_cannot_quote_is_refused():
    with pytest.raises(GradtuneError, match="--ollama: cannot write"):
        modelfile(vocab(SMOLLM2.replace("named SmolLM", 'named """SmolLM"""')), "m.gguf")
