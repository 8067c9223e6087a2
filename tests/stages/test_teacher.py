"""What the student learns from (protege.stages.teacher): the cached teacher, or the live one with augmentation."""
import protege
from protege.recipe import parse_recipe


def _count_teacher_forwards(monkeypatch) -> dict:
    from protege.knowledge import Teacher

    counts = {"n": 0}
    init = Teacher.__init__

    def counting_init(self, model, cache=None, paths=()):
        init(self, model, cache, paths)
        model.register_forward_hook(lambda *_: counts.__setitem__("n", counts["n"] + 1))

    monkeypatch.setattr(Teacher, "__init__", counting_init)
    return counts


def test_cached_teacher_is_never_run_inside_epochs(tmp_path, tiny, monkeypatch):
    counts = _count_teacher_forwards(monkeypatch)
    run = protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    assert counts["n"] == 0
    assert (run.path / "teacher_cache" / "t0" / "meta.json").is_file()


def test_augmentation_means_live_teacher(tmp_path, tiny, monkeypatch):
    counts = _count_teacher_forwards(monkeypatch)
    tiny["train"]["augment"] = True
    run = protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    batches = -(-len(protege.data.load_data(run.recipe.data, 0).train) // tiny["train"]["batch_size"])
    assert counts["n"] == batches * tiny["train"]["epochs"]
    assert not (run.path / "teacher_cache").exists()
