"""Focused tests of protege.export.onnx: export of a tiny MLP and a tiny CNN with a dynamic batch dimension, the parity
check against PyTorch in ONNX Runtime, the one-line errors for failed exports and damaged files, and ort_logits'
batching. Real exports are few (module-scoped fixtures); the error paths fake the exporter where a real one is not
needed."""
from __future__ import annotations

import copy
import errno
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from protege.errors import ExportError, ModelError, ProtegeError, StorageError
from protege.export.onnx import export_model_onnx, onnx_parity, ort_logits, ort_session


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class NamedInput(nn.Module):
    """forward's argument is not called ``x``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, features):
        return self.lin(features).tanh()


def _mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def _cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics, so eval mode differs from train mode
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 3 + 1)
    return model.eval()


def _x(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    model = _mlp()
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    assert export_model_onnx(model, _x(5, 4), path) == path
    return model, path


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    model = _cnn()
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    assert export_model_onnx(model.train(), _x(3, 1, 8, 8), path) == path  # export puts it in eval mode itself
    assert not model.training
    return model, path


# ---------------------------------------------------------------- export and parity
def test_mlp_export_has_named_io_a_dynamic_batch_and_no_leftovers(mlp_file):
    model, path = mlp_file
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.onnx"]  # the temporary file was renamed
    session = ort_session(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "input" and out.name == "logits"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [4]  # symbolic batch dimension
    assert isinstance(out.shape[0], str) and out.shape[1:] == [3]
    graph = onnx.load(str(path))
    assert {o.domain: o.version for o in graph.opset_import}.get("", None) == 18
    assert all(len(n.metadata_props) == 0 and n.doc_string == "" for n in graph.graph.node)  # debug info stripped
    assert len(graph.graph.value_info) == 0


def test_mlp_parity_passes_and_returns_the_max_difference(mlp_file):
    model, path = mlp_file
    x = _x(37, 4)
    diff = onnx_parity(model, path, x, tolerance=1e-5)
    assert isinstance(diff, float) and 0.0 <= diff <= 1e-5
    got = ort_logits(ort_session(path), x)
    with torch.no_grad():
        assert float((model(x) - got).abs().max()) == pytest.approx(diff, abs=1e-12)


def test_cnn_export_parity_in_eval_mode(cnn_file):
    model, path = cnn_file
    x = _x(10, 1, 8, 8)
    assert onnx_parity(model, path, x, tolerance=1e-4) <= 1e-4
    with torch.no_grad():  # the file holds the eval-mode graph: it does not match train-mode BatchNorm
        train_mode = copy.deepcopy(model).train()(x)  # a copy: train mode would update the running statistics
    assert float((train_mode - ort_logits(ort_session(path), x)).abs().max()) > 1e-3


@pytest.mark.parametrize("batch", [1, 2, 7, 300])
def test_dynamic_batch_sizes(mlp_file, cnn_file, batch):
    for (model, path), shape in ((mlp_file, (4,)), (cnn_file, (1, 8, 8))):
        x = _x(batch, *shape, seed=batch)
        (out,) = ort_session(path).run(None, {"input": x.numpy()})
        assert out.shape == (batch, 3)
        with torch.no_grad():
            assert np.allclose(out, model(x).numpy(), atol=1e-5)


def test_parity_over_more_inputs_than_one_chunk(mlp_file):
    """onnx_parity runs PyTorch in chunks of 256 and ONNX Runtime in batches of 512: 700 inputs cross both."""
    model, path = mlp_file
    assert onnx_parity(model, path, _x(700, 4), tolerance=1e-5) <= 1e-5


def test_export_of_a_model_whose_argument_is_not_x(tmp_path):
    torch.manual_seed(0)
    model = NamedInput().eval()
    path = export_model_onnx(model, _x(1, 4), tmp_path / "named.onnx")  # a batch of 1 still gives a dynamic batch
    session = ort_session(path)
    assert isinstance(session.get_inputs()[0].shape[0], str)
    for batch in (1, 5):
        assert onnx_parity(model, path, _x(batch, 4, seed=batch), tolerance=1e-5) <= 1e-5


# ---------------------------------------------------------------- parity failures
def test_a_different_model_fails_parity_with_a_one_line_export_error(mlp_file):
    _, path = mlp_file
    with pytest.raises(ExportError) as e:
        onnx_parity(_mlp(seed=1), path, _x(20, 4), tolerance=1e-3)
    msg = str(e.value)
    assert "\n" not in msg and "differs from PyTorch" in msg and "tolerance 0.001" in msg and "on 20 held-out inputs" in msg


def test_the_tolerance_is_the_threshold(mlp_file):
    model, path = mlp_file
    nudged = _mlp()
    with torch.no_grad():
        nudged.body[2].bias.add_(1e-3)  # every logit moves by 1e-3
    diff = onnx_parity(nudged, path, _x(8, 4), tolerance=1e-2)
    assert diff == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ExportError, match="differs from PyTorch by 0.001"):
        onnx_parity(nudged, path, _x(8, 4), tolerance=5e-4)


def test_non_finite_outputs_fail_parity_whatever_the_tolerance(mlp_file):
    _, path = mlp_file
    broken = _mlp()
    with torch.no_grad():
        broken.body[0].weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match="differs from PyTorch by nan"):
        onnx_parity(broken, path, _x(4, 4), tolerance=1e9)


def test_parity_puts_the_model_in_eval_mode(cnn_file):
    model, path = cnn_file
    model.train()
    assert onnx_parity(model, path, _x(6, 1, 8, 8), tolerance=1e-4) <= 1e-4 and not model.training


# ---------------------------------------------------------------- export failures
def test_a_model_that_cannot_be_exported_is_a_one_line_export_error(tmp_path):
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            raise RuntimeError("boom")

    path = tmp_path / "boom.onnx"
    with pytest.raises(ExportError) as e:
        export_model_onnx(Boom(), _x(2, 4), path)
    assert str(e.value).startswith("ONNX export failed: ") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


class _FakeProgram:
    def __init__(self, save):
        self._save = save

    def save(self, path):
        self._save(path)


def _fake_exporter(monkeypatch, save=None, raises: BaseException | None = None):
    """Replace torch.onnx.export: it raises ``raises``, or returns a program whose save() runs ``save(path)``."""
    def export(*args, **kwargs):
        if raises is not None:
            raise raises
        return _FakeProgram(save)
    monkeypatch.setattr(torch.onnx, "export", export)


def test_an_exporter_error_keeps_only_its_first_line(tmp_path, monkeypatch):
    _fake_exporter(monkeypatch, raises=ValueError("unsupported operator Foo\nlong details\nmore"))
    with pytest.raises(ExportError) as e:
        export_model_onnx(_mlp(), _x(2, 4), tmp_path / "m.onnx")
    assert str(e.value) == ("ONNX export failed: ValueError: unsupported operator Foo; change what it names in the model "
                            "(or deploy the PyTorch weights instead of ONNX)")


def test_an_exporter_error_names_its_innermost_cause_without_terminal_colours(tmp_path, monkeypatch):
    """torch's exporter wraps the reason (an operator it cannot translate) in errors of its own whose first line is
    a coloured "step 3/3" banner; the message shows the reason, plain."""
    try:
        try:
            raise KeyError("No ONNX function found for <OpOverload(op='aten.linalg_eig')>")
        except KeyError as inner:
            raise RuntimeError("Error when translating node %linalg_eig") from inner
    except RuntimeError as middle:
        wrapped = RuntimeError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m of exporting\n- Next steps")
        wrapped.__cause__ = middle
    _fake_exporter(monkeypatch, raises=wrapped)
    with pytest.raises(ExportError) as e:
        export_model_onnx(_mlp(), _x(2, 4), tmp_path / "m.onnx")
    message = str(e.value)
    assert message.startswith("ONNX export failed: KeyError: \"No ONNX function found for <OpOverload(op='aten.linalg_eig')>")
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_is_a_storage_error_and_keeps_the_earlier_file(tmp_path, monkeypatch, code):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the earlier export")

    def save(p):
        Path(p).write_bytes(b"half a file")
        raise OSError(code, "simulated")

    _fake_exporter(monkeypatch, save=save)
    with pytest.raises(StorageError) as e:
        export_model_onnx(_mlp(), _x(2, 4), path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "simulated" in msg
    assert path.read_bytes() == b"the earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_write_error_wrapped_by_the_exporter_is_still_a_storage_error(tmp_path, monkeypatch):
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
        try:
            raise RuntimeError("the exporter failed") from inner
        except RuntimeError as outer:
            wrapped = outer
    _fake_exporter(monkeypatch, raises=wrapped)
    with pytest.raises(StorageError, match="No space left on device"):
        export_model_onnx(_mlp(), _x(2, 4), tmp_path / "m.onnx")


def test_an_unreadable_exported_file_is_an_export_error(tmp_path, monkeypatch):
    _fake_exporter(monkeypatch, save=lambda p: Path(p).write_bytes(b"\x00garbage"))
    with pytest.raises(ExportError):
        export_model_onnx(_mlp(), _x(2, 4), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_propagates_also_when_the_exporter_wraps_it(tmp_path, monkeypatch):
    _fake_exporter(monkeypatch, raises=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        export_model_onnx(_mlp(), _x(2, 4), tmp_path / "m.onnx")
    try:
        raise KeyboardInterrupt()
    except KeyboardInterrupt as inner:
        try:
            raise RuntimeError("exporter: interrupted") from inner
        except RuntimeError as outer:
            wrapped = outer
    _fake_exporter(monkeypatch, raises=wrapped)
    with pytest.raises(KeyboardInterrupt):
        export_model_onnx(_mlp(), _x(2, 4), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- sessions and damaged files
def test_a_session_from_bytes_or_unoptimized_gives_the_same_logits(mlp_file):
    _, path = mlp_file
    x = _x(9, 4)
    reference = ort_logits(ort_session(path), x)
    assert torch.allclose(ort_logits(ort_session(path.read_bytes()), x), reference, atol=1e-6)
    assert torch.allclose(ort_logits(ort_session(path, threads=1, optimize=False), x), reference, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "zeros", "empty"])
def test_a_damaged_onnx_file_is_a_one_line_storage_error(mlp_file, tmp_path, damage):
    data = mlp_file[1].read_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes({"truncated": data[: len(data) // 2], "random bytes": np.random.default_rng(0).bytes(400),
                      "zeros": b"\x00" * 100, "empty": b""}[damage])
    with pytest.raises(StorageError) as e:
        ort_session(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert ("is empty (0 bytes)" if damage == "empty" else "truncated or damaged") in msg
    assert msg.endswith("export the model to ONNX again")


def test_an_empty_onnx_file_is_a_one_line_protege_error(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises((StorageError, ModelError)) as e:
        ort_session(path)
    assert isinstance(e.value, ProtegeError) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_missing_onnx_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        ort_session(tmp_path / "nowhere.onnx")


def test_a_readable_but_invalid_graph_is_a_model_error(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["missing"], ["logits"])], "bad",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError) as e:
        ort_session(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"ONNX Runtime cannot load {path}")
    assert not isinstance(e.value, StorageError)


def test_a_damaged_file_of_a_run_folder_names_the_command_that_remakes_it(mlp_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    path = run / "student.onnx"
    path.write_bytes(mlp_file[1].read_bytes()[:100])
    with pytest.raises(StorageError) as e:
        ort_session(path)
    assert f"protege export {run}" in str(e.value)


# ---------------------------------------------------------------- ort_logits
class _CountingSession:
    def __init__(self, session):
        self.session, self.batches = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


@pytest.mark.parametrize("batch_size, expected", [(3, [3, 3, 3, 1]), (5, [5, 5]), (512, [10]), (10, [10]), (1, [1] * 10)])
def test_ort_logits_batches_give_the_same_result_as_one_batch(mlp_file, batch_size, expected):
    model, path = mlp_file
    x = _x(10, 4)
    whole = ort_logits(ort_session(path), x)
    counting = _CountingSession(ort_session(path))
    got = ort_logits(counting, x, batch_size=batch_size)
    assert counting.batches == expected
    assert isinstance(got, torch.Tensor) and got.shape == (10, 3) and got.dtype == torch.float32
    assert torch.allclose(got, whole, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(got, model(x), atol=1e-5)


def test_ctrl_c_during_export_propagates(tmp_path, monkeypatch):
    """The exporter wraps a KeyboardInterrupt raised mid-import in its own error; it must still come out as one."""
    from protege.export.onnx import export_model_onnx

    def interrupted(*args, **kwargs):  # as seen with torch 2.13: KeyboardInterrupt <- AttributeError <- TorchExportError
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
        except AttributeError as e:
            raise RuntimeError("Failed to export the model with torch.export.") from e

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []

    def failing(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", failing)
    from protege.errors import ExportError

    with pytest.raises(ExportError, match="ONNX export failed: RuntimeError: unsupported operator"):
        export_model_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx")
