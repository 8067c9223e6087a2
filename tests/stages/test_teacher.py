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


def test_fixed_views_cache_the_teacher_on_exactly_what_the_student_sees(tmp_path, tiny, monkeypatch):
    import torch

    from protege.data.views import Views
    from protege.train.distiller import Distiller

    counts = _count_teacher_forwards(monkeypatch)
    seen = []
    call = Distiller.__call__

    def recording(self, model, x, y, idx):
        with torch.no_grad():  # the cached answer for each row against the teacher run on the image the student got
            seen.append((x.clone(), idx.clone(), self.teachers[0](x, idx).logits, self.teachers[0].model(x)))
        return call(self, model, x, y, idx)

    monkeypatch.setattr(Distiller, "__call__", recording)
    tiny["train"]["augment"] = True
    tiny["distill"]["teacher_views"] = 2
    run = protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    train = protege.data.load_data(run.recipe.data, 0).train
    n, per_epoch = len(train), -(-len(train) // tiny["train"]["batch_size"])
    assert counts["n"] == per_epoch * tiny["train"]["epochs"]  # only the recorder's own checks ran the teacher
    views = Views(n, 2)
    assert len(seen) == per_epoch * tiny["train"]["epochs"]
    for step, (x, idx, cached, live) in enumerate(seen):
        view = (step // per_epoch) % 2  # epoch e trains on view e mod 2
        assert torch.equal(idx // n, torch.full_like(idx, view))
        assert torch.equal(x, views.apply(train.x[idx % n], idx % n, view))  # augmented, as fixed for that view
        assert torch.allclose(cached, live, atol=1e-5)  # the cache holds the teacher's answer for that very image
    assert not torch.equal(seen[0][0], train.x[seen[0][1]])  # the student saw augmented images
    caches = list((run.path / "teacher_cache").iterdir())
    assert len(caches) == 1 and '"views"' in (caches[0] / "meta.json").read_text()


def test_teacher_views_need_augmentation_and_a_cache(tiny):
    import pytest

    from protege.errors import RecipeError

    tiny["distill"]["teacher_views"] = 4
    with pytest.raises(RecipeError, match="train.augment: true"):
        parse_recipe(tiny)
    tiny["train"]["augment"] = True
    tiny["distill"]["cache_teacher"] = False
    with pytest.raises(RecipeError, match="cache_teacher: true"):
        parse_recipe(tiny)
