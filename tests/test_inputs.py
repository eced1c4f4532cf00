"""Every file a user can give is read behind one guard: bad bytes or a bad document end in a
:class:`SlimkitError` naming the file (CLI: a message, exit code 2, nothing written), never in
another exception's traceback.

Random bytes and random YAML / JSON documents (hypothesis) go to every reader: the recipe, ONNX
files, weights (.safetensors and state dicts), pickled models (--trust-pickle), npz and IDX
data, the ``.slim`` packed format, latency tables, NAS space files and SQLite study databases.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimkit.data import load_data, read_idx
from slimkit.errors import SlimkitError
from slimkit.export.packed import load_packed, read_packed, write_packed
from slimkit.measure import read_onnx
from slimkit.models import build_model, load_model, load_weights
from slimkit.nas import LatencyTable, get_family, load_space
from slimkit.pipeline import Recipe
from slimkit.search import open_storage

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# documents shaped like slimkit's own: the keys its readers look for, so random values reach
# the validation past the first "is it a mapping" check
_KEYS = st.sampled_from(["width", "stages", "blocks", "kernel", "expand", "family", "steps", "finetune", "export",
                         "prune", "quantize", "epochs", "ratio", "kind", "format", "target", "batch", "threads",
                         "input_shape", "num_classes", "space", "fixed_ms", "ms", "x", "y"])
_SCALARS = (st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=12))
DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_KEYS | st.text(max_size=6) | st.integers(0, 3), inner, max_size=5),
    max_leaves=25,
)
RANDOM_BYTES = st.binary(min_size=0, max_size=600)


def guarded(reader: Callable[[Path], Any], data: bytes, name: str) -> None:
    """Write ``data`` to a file ``name``; ``reader`` must return or raise a SlimkitError naming it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            reader(path)
        except SlimkitError as e:
            assert path.name in str(e), str(e)


def _yaml_bytes(doc: Any) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8")


def _packed_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model("zoo:lenet300,hidden=[16,8]", input_shape=(1, 8, 8), num_classes=10)
        write_packed(Path(tmp) / "m.slim", model, {})
        return (Path(tmp) / "m.slim").read_bytes()


PACKED = _packed_bytes()


# ----------------------------------------------------------------------------- random bytes


@FAST
@given(RANDOM_BYTES)
def test_recipe_and_onnx_readers(data):
    guarded(Recipe.load, data, "recipe.yaml")
    guarded(read_onnx, data, "model.onnx")


@FAST
@given(RANDOM_BYTES)
def test_weights_and_pickled_model_readers(data):
    guarded(load_weights, data, "w.safetensors")
    guarded(load_weights, data, "w.pt")
    guarded(lambda p: load_model(str(p), trust_pickle=True, input_shape=(1, 8, 8), num_classes=10), data, "m.pt")


@FAST
@given(RANDOM_BYTES, st.sampled_from([b"", b"PK\x03\x04", b"\x00\x00\x08\x03", b"\x00\x00\x08\x01"]))
def test_data_readers(data, prefix):
    guarded(lambda p: load_data(f"npz:{p}"), prefix + data, "d.npz")
    guarded(read_idx, prefix + data, "train-images-idx3-ubyte")

    def idx_folder(p: Path) -> None:
        (p.parent / "train-labels-idx1-ubyte").write_bytes(prefix + data[::-1])
        load_data(f"idx:{p.parent}")

    guarded(idx_folder, prefix + data, "train-images-idx3-ubyte")


@FAST
@given(RANDOM_BYTES, st.integers(0, len(PACKED)), st.integers(0, len(PACKED) - 1))
def test_packed_reader(data, cut, flip):
    guarded(read_packed, data, "m.slim")
    guarded(read_packed, b"SLIM" + data, "m.slim")
    guarded(load_packed, PACKED[:cut], "m.slim")  # truncated
    damaged = bytearray(PACKED)
    damaged[flip] ^= 0x5A
    guarded(load_packed, bytes(damaged), "m.slim")


@FAST
@given(RANDOM_BYTES)
def test_table_space_and_study_readers(data):
    guarded(LatencyTable.load, data, "table.json")
    guarded(lambda p: load_space(get_family("resnet"), p), data, "space.yaml")
    guarded(lambda p: open_storage(f"sqlite:///{p}"), data, "study.db")


# ----------------------------------------------------------------------------- random documents


@FAST
@given(DOCUMENTS)
def test_random_yaml_documents(doc):
    guarded(Recipe.load, _yaml_bytes(doc), "recipe.yaml")
    guarded(lambda p: load_space(get_family("resnet"), p), _yaml_bytes(doc), "space.yaml")
    guarded(lambda p: load_space(get_family("mobilenetv2"), p), _yaml_bytes({"stages": doc}), "space.yaml")


@FAST
@given(DOCUMENTS, DOCUMENTS)
def test_random_json_latency_tables(doc, other):
    guarded(LatencyTable.load, json.dumps(doc).encode(), "table.json")
    table = {"kind": "slimkit-latency-table", "format": 1, "family": "resnet", "target": "ort-cpu", "batch": 1,
             "threads": 1, "input_shape": [1, 8, 8], "num_classes": 10, "space": {"width": [0.5]},
             "blocks": {}, "fixed_ms": {"0.5": 1.0}, "stages": {}}
    if isinstance(other, dict) and other:  # one field of a well-formed header replaced by a random document
        key = random.Random(len(other)).choice(list(table))
        guarded(LatencyTable.load, json.dumps({**table, key: other}).encode(), "table.json")
    if isinstance(doc, dict):
        table.update(doc)  # well-formed header, random body
    guarded(LatencyTable.load, json.dumps(table).encode(), "table.json")


def _small_table() -> dict[str, Any]:
    """A well-formed latency table of a one-choice resnet space (what slimkit latency-table writes, trimmed)."""
    stage = [{"knobs": {"kernel": 3}, "first": "b", "next": "b"}]
    return {"kind": "slimkit-latency-table", "format": 1, "family": "resnet", "target": "ort-cpu", "batch": 1,
            "threads": 1, "input_shape": [1, 8, 8], "num_classes": 10,
            "space": {"width": [0.5], "stages": [{"blocks": [1, 2], "kernel": [3]}] * 3},
            "blocks": {"b": {"ms": 0.25}}, "fixed_ms": {"0.5": 1.0}, "stages": {"0.5": [stage] * 3}}


@FAST
@given(st.data(), DOCUMENTS)
def test_damaged_latency_tables(data, doc):
    table = json.loads(json.dumps(_small_table()))
    node: Any = table
    while True:  # walk to a random place in the table, and put a random document there
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or not node[key] or data.draw(st.booleans()):
            node[key] = doc
            break
        node = node[key]

    def load_and_use(p: Path) -> None:
        t = LatencyTable.load(p)
        t.describe()
        t.fastest()

    guarded(load_and_use, json.dumps(table).encode(), "table.json")


def test_readers_accept_their_own_files(tmp_path, trained):
    _, weights = trained("lenet300")
    assert load_weights(weights)
    assert LatencyTable.load(_write(tmp_path / "t.json", json.dumps(_small_table()).encode())).fastest()[0] == 1.75
    (tmp_path / "m.slim").write_bytes(PACKED)
    model = load_model(str(tmp_path / "m.slim"), input_shape=(1, 8, 8), num_classes=10)  # --model FILE.slim
    assert type(model).__name__ == "LeNet300"
    assert load_space(get_family("resnet"), _write(tmp_path / "s.yaml", b"width: [0.5]\n")).width == (0.5,)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- the CLI


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("case", ["binary recipe", "random onnx", "truncated slim", "random weights"])
def test_cli_bad_inputs_exit_2_and_write_nothing(cli, tmp_path, case):
    rnd = random.Random(case).randbytes(700)
    (tmp_path / "good.yaml").write_text("- export\n")
    (tmp_path / "bin.yaml").write_bytes(b"\x00\xff\xfe" + rnd)
    (tmp_path / "rand.onnx").write_bytes(rnd)
    (tmp_path / "rand.pt").write_bytes(rnd)
    (tmp_path / "cut.slim").write_bytes(PACKED[: len(PACKED) // 2])
    model = ["--model", "zoo:lenet300", "--data", "digits"]
    args, name = {
        "binary recipe": (["apply", "bin.yaml", *model, "--out", "out"], "bin.yaml"),
        "random onnx": (["profile", *model, "--onnx", "rand.onnx"], "rand.onnx"),
        "truncated slim": (["apply", "good.yaml", "--model", "./cut.slim", "--data", "digits", "--out", "out"],
                           "cut.slim"),
        "random weights": (["apply", "good.yaml", *model, "--weights", "rand.pt", "--out", "out"], "rand.pt"),
    }[case]
    r = cli(*args, cwd=tmp_path)
    assert r.code == 2, r
    assert name in _words(r.err + r.out), r
    assert "Traceback" not in r.err + r.out
    assert not (tmp_path / "out").exists()
