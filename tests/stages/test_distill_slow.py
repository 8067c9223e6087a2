"""Real-data runs (minutes): `make test-slow`."""
import pytest

import protege
from protege.data.loaders import FASHION_DIR

from ..conftest import ROOT


pytestmark = pytest.mark.slow


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_short_run_learns(tmp_path):
    """Two teacher epochs and two student epochs on all 54k training images: well above chance."""
    recipe = protege.load_recipe(ROOT / "recipes" / "fashion_mnist.yaml",
                                 ["teacher.train.epochs=2", "train.epochs=2", "teacher.train.augment=false"])
    report = protege.distill(recipe, tmp_path / "fmnist").report
    assert report.teacher.accuracy > 0.85
    assert report.student_onnx.accuracy > 0.80
    assert report.student.agreement > 0.80
    assert report.onnx_max_abs_diff <= 1e-4
