"""reference/io/safetensors.py: the one reader and writer of the safetensors format, against the library's own.

Every dtype of the table round-trips exactly (bf16 included), and write_safetensors' file is the safetensors
library's file byte for byte. The header checks on hostile files are in tests/reference/test_checkpoint.py (through
from_pretrained) and tests/security/test_hostile.py (through the `jetmoe` command).
"""

import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reference.io.safetensors import DTYPES, SafetensorsError, Writer, read_safetensors, write_safetensors


def random_tensor(rng, dtype, shape):
    """Fresh random values of `dtype`: every bit pattern for the integers, normal draws for the floats."""
    if dtype == np.bool_:
        return np.asarray(rng.integers(0, 2, size=shape)).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.asarray(rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype))
    return np.asarray(rng.standard_normal(shape) * 10).astype(dtype)


def every_dtype(rng):
    """One tensor of each dtype in the table, of random shape (a scalar and an empty tensor besides), named so that
    neither the name order nor the dtype order alone is the library's."""
    tensors = {f"{chr(ord('z') - i)}.{code}": random_tensor(rng, dtype, tuple(rng.integers(1, 5, rng.integers(0, 4))))
               for i, (code, dtype) in enumerate(DTYPES.items())}
    tensors["a.scalar"] = random_tensor(rng, np.dtype(np.float32), ())
    tensors["b.empty"] = random_tensor(rng, np.dtype(np.int64), (3, 0))
    tensors["c.big_endian"] = random_tensor(rng, np.dtype(">f8"), (2, 3))  # written byte-swapped, as the library does
    return tensors


def assert_exact(got, want):
    assert list(got) == list(want) if isinstance(want, list) else sorted(got) == sorted(want)
    for name in want:
        want_little = want[name].astype(want[name].dtype.newbyteorder("<") if want[name].dtype.byteorder == ">"
                                        else want[name].dtype)
        assert got[name].dtype == want_little.dtype and got[name].shape == want_little.shape, name
        assert got[name].tobytes() == want_little.tobytes(), name  # bitwise: bf16 included, NaN payloads too


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"order": "ü,\n\x01\"é"}],
                         ids=["none", "empty", "format", "non_ascii"])
def test_files_are_the_librarys_byte_for_byte(rng, tmp_path, metadata):
    tensors = every_dtype(rng)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, metadata)
    save_file(tensors, str(theirs), metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()
    got, got_metadata = read_safetensors(ours, with_metadata=True)
    assert_exact(got, tensors)
    assert got_metadata == (metadata or {})


def test_several_metadata_keys_read_both_ways(rng, tmp_path):
    # the library writes several metadata keys in its hash map's order: the files then differ in that order only,
    # so each side reads the other's file exactly
    tensors, metadata = every_dtype(rng), {"format": "pt", "dtype": "float32", "order": "a,b"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, metadata)
    save_file(tensors, str(theirs), metadata=metadata)
    assert_exact(load_file(str(ours)), tensors)
    got, got_metadata = read_safetensors(theirs, with_metadata=True)
    assert_exact(got, tensors)
    assert got_metadata == metadata
    assert ours.stat().st_size == theirs.stat().st_size


def test_the_writer_streams_in_the_callers_order(rng, tmp_path):
    tensors = every_dtype(rng)
    order = list(rng.permutation(sorted(tensors)))
    path = tmp_path / "streamed.safetensors"
    with Writer(path, [(n, tensors[n].dtype, tensors[n].shape) for n in order], {"order": ",".join(order)}) as w:
        for n in order:
            assert not path.exists()  # the file appears whole, at close
            w.write(n, tensors[n])
    got = read_safetensors(path)
    assert list(got) == order
    assert_exact(got, tensors)
    assert_exact(load_file(str(path)), tensors)


def test_a_dtype_outside_the_table_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    for dtype in (np.complex64, np.uint16, np.dtype(">u2")):
        with pytest.raises(SafetensorsError, match=re.escape(f"x.safetensors: tensor 'layers.0.w' has dtype "
                                                             f"{np.dtype(dtype)}, which safetensors cannot hold")):
            write_safetensors(path, {"ok": np.ones(2, np.float32), "layers.0.w": np.ones(2, dtype)})
        assert not path.exists() and not (tmp_path / "x.safetensors.partial").exists()


def test_a_stream_that_departs_from_its_header_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    specs = [("a", np.float32, (2,)), ("b", np.int64, (3,))]
    for name, array, message in [("b", np.ones(3, np.int64), "got tensor 'b' int64 [3], the header lists 'a' float32 "
                                                             "[2] next"),
                                 ("a", np.ones(2, np.float64), "got tensor 'a' float64 [2], the header lists 'a'"),
                                 ("a", np.ones(3, np.float32), "got tensor 'a' float32 [3], the header lists 'a'")]:
        with pytest.raises(SafetensorsError, match=re.escape(f"x.safetensors: {message}")), Writer(path, specs) as w:
            w.write(name, array)
        assert not path.exists() and not (tmp_path / "x.safetensors.partial").exists()
    with pytest.raises(SafetensorsError, match=r"tensor 'b' \(and 0 more\) was never written"):
        with Writer(path, specs) as w:
            w.write("a", np.ones(2, np.float32))
    assert not path.exists() and not (tmp_path / "x.safetensors.partial").exists()
    with pytest.raises(SafetensorsError, match="tensor name 'a' is given twice"):
        Writer(path, specs + [("a", np.float32, (1,))])
    with pytest.raises(SafetensorsError, match="metadata must map strings to strings"):
        Writer(path, specs, {"step": 3})
