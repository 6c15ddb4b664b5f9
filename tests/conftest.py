import functools
import gc
import os
import tempfile

# Under pytest-xdist (make test: one worker per core) each worker and the processes it starts
# compute on one thread: two workers of two OpenMP threads each on two cores spin against each
# other (the suite reached 21% in 10 minutes, against 5 minutes with one thread each). Set
# before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    # Collection (torch, transformers, every test module) creates no garbage: the collector is off
    # until it ends (pytest_collection_finish), ~2 s of each worker's start.
    gc.disable()

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.hooks import LONG  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# One cache root for the whole suite (both xdist workers, the processes they start, the README
# blocks): nothing is written to the user's ~/.cache, and a .gguf base is converted once per
# machine, not once per test or worker (~25 s each for SmolLM2). Entries are keyed by content and
# written by rename (runtime/cache.py), so concurrent sessions share it safely.
os.environ.setdefault("GRADTUNE_CACHE", os.path.join(tempfile.gettempdir(), f"gradtune-tests-{os.getuid()}"))


def _memoise_gguf_lookups() -> None:
    """transformers' GGUF loader (the oracle of the GGUF tests, and the conversion of a .gguf base on
    its first load) builds gguf's tensor-name map once per tensor (397 times for SmolLM2, ~5 s) and
    parses the file's metadata twice per load (~4 s): both pure functions of their arguments (a file
    by its inode, size and mtime), so the suite keeps one of each. Nothing they return is changed."""
    try:
        import gguf
    except ImportError:
        return
    name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    reader_class, last = gguf.GGUFReader, {}  # the newest reader only: no file is held open for long

    def reader(path, mode="r"):
        if mode != "r":
            return reader_class(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in last:
            last.clear()
            last[key] = reader_class(path, mode)
        return last[key]

    gguf.get_tensor_name_map, gguf.GGUFReader = name_map, reader


_memoise_gguf_lookups()

# Tests never reach a hub: every model and data set comes from local files or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


FIRST = (
    "tests/e2e/test_fsdp_resume.py::test_fsdp_sigkill_at_random_moments_resumes_bitwise",
    "tests/e2e/test_rl.py::test_smollm2_lora_grpo_raises_the_mean_reward",
    "tests/e2e/test_gguf_export.py::test_smollm2_lora_run_exports_f32_and_q8_0",
    "tests/e2e/test_dpo.py::test_smollm2_lora_dpo_raises_the_margin_and_keeps_the_reference",
    "tests/e2e/test_trained_only.py::test_smollm2_lora_run_stores_under_10_mb_and_reloads_from_the_base",
    "tests/e2e/test_instruction_smollm2.py::test_smollm2_lora_learns_the_answer_format",
    "tests/e2e/test_quantize.py::test_smollm2_lora_on_a_quantised_base",
    "tests/e2e/test_finetune_spam.py::test_minilm_spam_accuracy",
)


SERIAL_FILES = pytest.StashKey[dict]()  # node id -> file of every test marked serial, before -m deselects


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each: real-model training curves, multi-GiB data) run only
    with GRADTUNE_LONG_TESTS=1 (``make test-long``): ``make test`` must fit CI's 12 minutes."""
    # Longest first (minutes-long tests measured in a quiet `make test`): xdist hands out tests in
    # collection order, so one started last would run alone on one core while the other idles.
    config.stash[SERIAL_FILES] = {item.nodeid: item.path for item in items if "serial" in item.keywords}
    items.sort(key=lambda item: next((i for i, first in enumerate(FIRST) if item.nodeid.startswith(first)), len(FIRST)))
    if LONG:
        return
    skip = pytest.mark.skip(reason="long test: GRADTUNE_LONG_TESTS=1 (make test-long) runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """What collection loaded (torch, transformers, every test module) lives as long as the worker:
    frozen out of the collector's full passes, which the in-process tests trigger again and again."""
    gc.freeze()
    gc.enable()


SERIAL_PHASES = ("serial", "serial and not slow")  # the Makefile's second phase of test / test-fast


def pytest_ignore_collect(collection_path, config):
    """The serial phase runs a handful of tests: it does not import the test files that cannot hold
    one (no ``serial`` in their text), ~10 s of collecting the whole suite again."""
    if config.option.markexpr.strip() in SERIAL_PHASES and collection_path.suffix == ".py":
        if collection_path.name.startswith("test_") and "serial" not in collection_path.read_text():
            return True
    return None
