import gzip
import struct

import numpy as np
import pytest
import torch

from slimkit.data import load_data, read_idx
from slimkit.errors import SlimkitError

from .conftest import FASHION


def test_digits_split_is_deterministic_and_disjoint(digits):
    again = load_data("digits", seed=0)
    other = load_data("digits", seed=1)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert torch.equal(digits.x_test, again.x_test) and torch.equal(digits.y_train, again.y_train)
    assert not torch.equal(digits.x_test, other.x_test)
    sizes = digits.sizes()
    assert sum(sizes.values()) == 1797 and min(sizes.values()) > 150
    assert 0.0 <= float(digits.x_train.min()) and float(digits.x_train.max()) <= 1.0
    # every class is represented in the test split (stratified)
    assert set(digits.y_test.tolist()) == set(range(10))


def test_stratified_split_is_a_partition():
    from slimkit.data import _stratified_split

    y = np.arange(103) % 7
    keep, held = _stratified_split(y, 0.2, seed=3)
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(103))
    assert set(y[held].tolist()) == set(range(7))


def test_calibration_subset_is_fixed_by_seed(digits):
    a, b = digits.calibration(64), digits.calibration(64)
    assert a.shape == (64, 1, 8, 8) and torch.equal(a, b)
    assert len(digits.calibration(10**6)) == len(digits.x_train)
    with pytest.raises(SlimkitError, match="at least 1"):
        digits.calibration(0)


def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[np.uint8], array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_gz_and_plain(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    x = rng.integers(0, 256, (200, 6, 6))
    y = np.arange(200) % 4
    xt = rng.integers(0, 256, (40, 6, 6))
    yt = np.arange(40) % 4
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", x, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", y, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", xt, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", yt, gz)
    d = load_data(f"idx:{tmp_path}")
    assert d.input_shape == (1, 6, 6) and d.num_classes == 4
    assert len(d.x_test) == 40 and len(d.x_train) + len(d.x_val) == 200
    np.testing.assert_allclose(d.x_test[0, 0].numpy(), xt[0] / 255.0, rtol=1e-6)


def test_idx_bad_files_are_explained(tmp_path):
    with pytest.raises(SlimkitError, match="no such folder"):
        load_data(f"idx:{tmp_path / 'missing'}")
    with pytest.raises(SlimkitError, match="no train-images"):
        load_data(f"idx:{tmp_path}")
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"hello world")
    with pytest.raises(SlimkitError, match="bad magic"):
        read_idx(bad)
    _write_idx(tmp_path / "t.idx", np.zeros((10, 4, 4)), gz=False)
    (tmp_path / "cut.idx").write_bytes((tmp_path / "t.idx").read_bytes()[:-5])
    with pytest.raises(SlimkitError, match="truncated"):
        read_idx(tmp_path / "cut.idx")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian():
    d = load_data(f"idx:{FASHION}")
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert len(d.x_test) == 10000 and len(d.x_train) + len(d.x_val) == 60000


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((120, 5)).astype(np.float32), y=np.arange(120) % 3)
    d = load_data(f"npz:{tmp_path / 'd.npz'}")
    assert d.input_shape == (5,) and d.num_classes == 3
    np.savez(tmp_path / "t.npz", x=rng.random((60, 4, 4)), y=np.arange(60) % 2,
             x_test=rng.random((20, 4, 4)), y_test=np.arange(20) % 2)
    d = load_data(f"npz:{tmp_path / 't.npz'}")
    assert d.input_shape == (1, 4, 4) and len(d.x_test) == 20


def test_npz_bad_inputs(tmp_path):
    with pytest.raises(SlimkitError, match="no such file"):
        load_data(f"npz:{tmp_path / 'nope.npz'}")
    np.savez(tmp_path / "noy.npz", x=np.zeros((20, 3)))
    with pytest.raises(SlimkitError, match="'x' and 'y'"):
        load_data(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "len.npz", x=np.zeros((20, 3)), y=np.zeros(19, dtype=int))
    with pytest.raises(SlimkitError, match="20 labels"):
        load_data(f"npz:{tmp_path / 'len.npz'}")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(SlimkitError, match="not a readable"):
        load_data(f"npz:{tmp_path / 'junk.npz'}")


def test_user_function_source(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    rng = np.random.default_rng(0)\n"
        "    return rng.random((50, 1, 4, 4)).astype('float32'), np.arange(50) % 5\n"
    )
    monkeypatch.chdir(tmp_path)
    d = load_data("mydata:load")
    assert d.input_shape == (1, 4, 4) and d.num_classes == 5
    with pytest.raises(SlimkitError, match="cannot import module"):
        load_data("nosuchmodule_xyz:load")
    with pytest.raises(SlimkitError, match="has no 'nothere'"):
        load_data("mydata:nothere")


def test_unknown_spec():
    with pytest.raises(SlimkitError, match="unknown data spec"):
        load_data("mnist-please")
