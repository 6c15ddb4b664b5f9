"""The harness's reading of a Markdown file: blocks, markers, commands and shown output."""

from __future__ import annotations

import pytest

from tests.readme import blocks as md

DOC = """# t

<!-- readme-test: skip (needs 8 GPUs; CI has none) -->
```bash
torchrun --nproc_per_node 8 x
```

<!-- readme-test: slow; scale=0.01; id=a; tol=0.05 -->
```bash
gradtune train model=mlp \\
    epochs=3   # trailing comment
# done: 3 steps ...
gradtune eval runs/latest

# not shown output: a blank line above
```

```console
$ gradtune train learning_rate=1
gradtune: error: unknown config key 'learning_rate' (did you mean 'lr'?)
```

```text
gradtune train [CONFIG.yaml]
```
"""


def test_blocks_markers_commands_and_shown_output(tmp_path):
    p = tmp_path / "R.md"
    p.write_text(DOC)
    gpu, slow, console = md.shell_blocks(p)
    assert gpu.skip == "needs 8 GPUs; CI has none"
    assert slow.options == {"slow": "", "scale": "0.01", "id": "a", "tol": "0.05"} and slow.name == "a"
    assert [c.text for c in slow.commands] == [
        "gradtune train model=mlp epochs=3   # trailing comment",
        "gradtune eval runs/latest",
    ]
    assert slow.commands[0].shown == ["done: 3 steps ..."] and slow.commands[1].shown == []
    assert console.commands[0].text == "gradtune train learning_rate=1"
    assert console.commands[0].shown == ["gradtune: error: unknown config key 'learning_rate' (did you mean 'lr'?)"]
    assert [b.tag for b in md.markdown_blocks(p)][-1] == "text"  # not shell: not run


@pytest.mark.parametrize("bad", ["skip", "skip ()", "slow; sped=2"])
def test_bad_markers_are_refused(bad):
    with pytest.raises(ValueError, match="readme-test marker"):
        md.parse_options(bad)


def test_indented_code_is_found(tmp_path):
    p = tmp_path / "R.md"
    p.write_text("text\n\n    torchrun x\n\nmore\n")
    assert md.indented_code(p) == [3]
