"""``gradtune generate`` on a real fine-tuned model: SmolLM2-135M-Instruct (GGUF), LoRA-tuned for 2
steps through the one loop, then greedy decoding with our KV-cached sampler must give
token for token what transformers' generate gives with the same weights."""

import pytest
import torch

from gradtune.cli import main
from gradtune.commands import generate as generate_cmd
from gradtune.finetune.lora import LoRALinear
from gradtune.jobs.reload import load_run
from gradtune.models.generate import generate
from tests.e2e.conftest import SMOLLM2_RUN

PROMPT = "What is the capital of Italy?"


@pytest.mark.slow
@SMOLLM2_RUN
def test_smollm2_lora_generate_equals_transformers(smollm2_lora_run, capsys, monkeypatch):
    out = smollm2_lora_run  # 2 LoRA steps on 16 prompts
    # Keep the run the command loads (a GGUF load is ~10-30 s): the reference below decodes
    # with exactly the weights the command used.
    loaded = []

    def keep(folder):
        loaded.append(load_run(folder))
        return loaded[-1]

    monkeypatch.setattr(generate_cmd, "load_run", keep)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20"]) == 0
    printed = capsys.readouterr().out.strip()

    run = loaded[0]
    assert run.kind == "pretrained" and any(isinstance(m, LoRALinear) for m in run.model.modules())
    assert any(m.lora_b.weight.abs().sum() > 0 for m in run.model.modules() if isinstance(m, LoRALinear))
    ids = torch.tensor([generate_cmd.encode_prompt(run, PROMPT)])  # (1, T): the chat template
    eos = run.tokenizer.eos_token_id
    expected = run.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )  # (1, T + n), n <= 20
    got = generate(run.model, ids, 20, temperature=0, eos_id=eos)
    assert got.tolist() == expected.tolist()
    # the new text only (--echo would put the rendered prompt in front)
    assert printed == run.tokenizer.decode(expected[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()
    assert expected.shape[1] > ids.shape[1]  # it did generate something
