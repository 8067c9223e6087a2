"""The classification task (protege.stages.classify): a student larger than its teacher is warned about."""
from __future__ import annotations



from ..log_capture import logged
from ..helpers import tiny_recipe_file as _recipe


def test_student_larger_than_teacher_is_warned(tmp_path):
    import protege

    lines: list[str] = []
    recipe = protege.load_recipe(_recipe(tmp_path, lambda r: (r["student"].update(kwargs={"hidden": [256]}),
                                                               r["train"].update(epochs=1))))
    with logged(lines):
        protege.distill(recipe, tmp_path / "out", evaluate_=False, export=False)
    warned = [ln for ln in lines if ln.startswith("warning: the student (")]
    assert len(warned) == 1 and "not smaller than the teacher" in warned[0] and "student.kwargs" in warned[0], lines
    lines.clear()
    with logged(lines):
        protege.distill(protege.load_recipe(_recipe(tmp_path, name="small.yaml")), tmp_path / "small", evaluate_=False,
                        export=False)
    assert not [ln for ln in lines if ln.startswith("warning")], lines
