"""`protege export` (protege.stages.export): a file over the tolerance fails and the good one is kept."""
import pytest

import protege


def test_export_over_tolerance_fails_and_keeps_the_good_file(finished_run, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from protege.stages import onnx as pipeline
    from protege.errors import ExportError

    def export_then_perturb(model, x, path, opset=18):  # an exporter bug: one weight off by 1e-3
        export(model, x, path, opset)
        proto = onnx.load(str(path))
        w = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 1e-3, w.name))
        onnx.save(proto, str(path))

    export = pipeline.export_model_onnx
    monkeypatch.setattr(pipeline, "export_model_onnx", export_then_perturb)
    good = finished_run.onnx_path.read_bytes()
    with pytest.raises(ExportError, match="differs from PyTorch"):
        protege.export_onnx(finished_run)
    assert finished_run.onnx_path.read_bytes() == good
    assert (finished_run.path / "student.rejected.onnx").is_file()
