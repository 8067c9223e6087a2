"""`protege distill` end to end through the Python API: the bundled digits run (report, run folder, selected
epoch), feature and relation terms, several teachers, self-distillation, cross-task teachers, every shipped
recipe on tiny data, and a text classifier from a fine-tuned teacher to dynamic int8."""
import copy
import json
import statistics
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import protege
from protege.data import load_data
from protege.data.loaders import FASHION_DIR
from protege.errors import ProtegeError
from protege.models import build_model
from protege.models.zoo import CNN
from protege.recipe import parse_recipe

from ..conftest import ROOT
from ..text_fixtures import write_bert_folder, write_text_data
from ..helpers import text_recipe as _recipe


def test_report_has_required_fields(finished_run):
    report = json.loads(finished_run.report_path.read_text())
    for key in ("teacher", "student", "student_onnx"):
        for field in ("accuracy", "params", "bytes", "latency_ms_b1", "latency_ms_b32"):
            assert report[key][field] > 0, (key, field)
    assert report["student_onnx"]["runtime"] == "onnxruntime"
    assert 0 <= report["onnx_max_abs_diff"] <= 1e-4
    assert report["compression_ratio"] == pytest.approx(report["teacher"]["params"] / report["student"]["params"])
    assert report["speedup_b1"] > 0
    # latency: all stages in one interleaved measurement per batch size; ratios paired by round
    lat = report["latency"]
    assert lat["rounds"] == 5 and lat["b1"]["calls_per_stage"] == 5 and lat["b32"]["calls_per_stage"] == 5  # >= 1 a round
    assert lat["reliable"] == (not lat["reasons"]) and {"other_share", "loadavg_1min", "busy"} <= set(lat["b1"]["load"])
    for key in ("teacher", "student", "student_onnx"):
        assert report[key]["latency_ms_b1_iqr"] >= 0 and isinstance(report[key]["latency_b32_reliable"], bool)
    rounds = lat["b1"]["round_medians_ms"]
    assert report["speedup_b1"] == pytest.approx(statistics.median(t / d for t, d in zip(rounds["teacher"], rounds["student_onnx"])))
    assert all(isinstance(report[f"{k}_reliable"], bool) for k in ("speedup_b1", "speedup_b32", "speedup_b1_pytorch"))
    assert report["student"]["accuracy"] == pytest.approx(report["student_onnx"]["accuracy"])
    assert 0 <= report["student"]["agreement"] <= 1 and 0 <= report["student"]["macro_f1"] <= 1
    assert report["environment"]["torch"] == torch.__version__


def test_run_folder_layout(finished_run):
    p = finished_run.path
    for name in ("recipe.yaml", "metrics.jsonl", "teacher/model.safetensors", "student/model.safetensors",
                 "student.onnx", "teacher_cache/t0/meta.json", "student/checkpoints/last.safetensors"):
        assert (p / name).is_file(), name
    rows = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["stage"] == "teacher"] == [1, 2, 3]
    assert [r["epoch"] for r in rows if r["stage"] == "student"] == [1, 2, 3]
    assert all({"loss", "ce", "kd", "val_accuracy"} <= set(r) for r in rows if r["stage"] == "student")
    assert yaml.safe_load((p / "recipe.yaml").read_text())["train"]["epochs"] == 3


def test_student_weights_are_the_validation_selected_epoch(finished_run):
    rows = [json.loads(x) for x in finished_run.metrics_path.read_text().splitlines() if '"student"' in x]
    accs = [r["val_accuracy"] for r in rows]
    cfg = json.loads((finished_run.path / "student" / "config.json").read_text())
    assert cfg["best_epoch"] == rows[accs.index(max(accs))]["epoch"]  # first epoch with the highest val accuracy
    saved = load_file(str(finished_run.student_weights))
    chosen = load_file(str(finished_run.path / "student/checkpoints/best.safetensors"))
    assert all(torch.equal(saved[k], chosen[k]) for k in saved)


def test_configs_beside_weights(finished_run):
    cfg = json.loads((finished_run.path / "student" / "config.json").read_text())
    assert cfg["model"] == "mlp" and cfg["num_classes"] == 10 and cfg["in_shape"] == [1, 8, 8]
    assert json.loads((finished_run.path / "teacher" / "config.json").read_text())["params"] > cfg["params"]


CNN_TEACHER = {"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}, "train": {"epochs": 2, "batch_size": 64}}
CNN_STUDENT = {"model": "cnn", "kwargs": {"channels": [4, 8], "depth": 1}}


@pytest.fixture
def cnn_recipe(tiny) -> dict:
    r = copy.deepcopy(tiny)
    r.update(teacher=copy.deepcopy(CNN_TEACHER), student=copy.deepcopy(CNN_STUDENT))
    r["train"]["epochs"] = 2
    return r


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in run.metrics_path.read_text().splitlines()]


def test_feature_distillation_end_to_end_exports_the_bare_student(tmp_path, cnn_recipe):
    cnn_recipe["distill"]["features"] = [{"loss": "hint", "student": "features.1", "teacher": "features.1"},
                                         {"loss": "rkd_angle", "student": "pool", "teacher": "pool", "weight": 2.0}]
    cnn_recipe["teacher"]["train"]["epochs"] = cnn_recipe["train"]["epochs"] = 5
    run = protege.distill(parse_recipe(cnn_recipe), tmp_path / "r")
    rows = [m for m in _metrics(run) if m["stage"] == "student"]
    assert len(rows) == 5 and rows[-1]["hint0"] > 0 and rows[-1]["rkd_angle1"] > 0
    (folder,) = (run.path / "teacher_cache").glob("t0_*")  # named by the hooked paths' hash
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["paths"] == ["features.1", "pool"] and meta["entries"]["features.1"]["dtype"] == "float16"
    saved = protege.models.loading.read_state_dict(run.student_weights)  # the bare student: no adapter, no prefix
    assert sorted(saved) == sorted(CNN((1, 8, 8), 10, (4, 8)).state_dict())
    assert run.report.student_onnx.accuracy == pytest.approx(run.report.student.accuracy)
    assert run.report.student.accuracy > 0.5


def test_two_teachers_with_confidence_weights(tmp_path, cnn_recipe):
    first = protege.distill(parse_recipe(cnn_recipe), tmp_path / "a", export=False, evaluate_=False)
    r = copy.deepcopy(cnn_recipe)
    r["more_teachers"] = [{"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}, "weights": str(first.teacher_weights), "weight": 2.0}]
    r["distill"].update(combine="confidence", features=[{"loss": "sp", "student": "features.1", "teacher": "features.1", "teacher_index": 1}])
    run = protege.distill(parse_recipe(r), tmp_path / "b", export=False, evaluate_=False)
    caches = sorted(p.name for p in (run.path / "teacher_cache").iterdir())
    assert caches[0] == "t0" and caches[1].startswith("t1_")  # logits only / with the hooked path
    assert [m for m in _metrics(run) if m["stage"] == "student"][-1]["sp0"] > 0


def test_born_again_generations(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["distill"]["generations"] = 2
    run = protege.distill(parse_recipe(r), tmp_path / "r", export=False, evaluate_=False)
    stages = {m["stage"] for m in _metrics(run)}
    assert {"teacher", "student", "student_gen2"} <= stages
    assert (run.path / "student" / "gen1.safetensors").is_file()
    gen1 = protege.models.loading.read_state_dict(run.path / "student" / "gen1.safetensors")
    final = protege.models.loading.read_state_dict(run.student_weights)
    assert any(not torch.equal(gen1[k], final[k]) for k in final)
    # generation 2 was taught by generation 1: its cached soft targets are keyed by that file and equal its logits
    from protege.run import file_digest

    meta = json.loads((run.path / "teacher_cache" / "gen2_t0" / "meta.json").read_text())
    assert meta["teacher"] == file_digest(run.path / "student" / "gen1.safetensors")
    data = protege.data.load_data(run.recipe.data, 0)
    g1 = protege.models.build_model(run.recipe.student, data.input_shape, 10)
    protege.models.load_weights(g1, run.path / "student" / "gen1.safetensors")
    import numpy as np

    cached = np.load(run.path / "teacher_cache" / "gen2_t0" / "0.npy")
    torch.testing.assert_close(torch.from_numpy(cached[:50]), protege.knowledge.predict_logits(g1, data.train.x[:50]))


def test_ema_teacher_is_the_students_running_average(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["teacher"] = {"model": "ema"}
    r["distill"].update(ema_decay=0.9, alpha=0.5)
    run = protege.distill(parse_recipe(r), tmp_path / "r", export=False)
    assert run.report.teacher.params == run.report.student.params
    t = protege.models.loading.read_state_dict(run.teacher_weights)
    s = protege.models.loading.read_state_dict(run.student_weights)
    assert any(not torch.equal(t[k], s[k]) for k in s) and not (run.path / "teacher_cache").exists()
    again = protege.distill(parse_recipe(r), tmp_path / "r", resume=True, export=False)  # a finished run: nothing redone
    assert all(torch.equal(t[k], v) for k, v in protege.models.loading.read_state_dict(again.teacher_weights).items())
    assert again.report.teacher.accuracy == run.report.teacher.accuracy


def test_student_initialised_from_the_teacher_starts_well_above_chance(tmp_path, tiny):
    """ResNet-14 teacher -> ResNet-8 student by block selection; lr 1e-9, so the score is the initialisation's."""
    r = copy.deepcopy(tiny)
    r["teacher"] = {"model": "resnet", "kwargs": {"depth": 14, "width": 8}, "train": {"epochs": 8, "batch_size": 64}}
    r["student"] = {"model": "resnet", "kwargs": {"depth": 8, "width": 8}}
    r["train"].update(epochs=1, lr=1e-9)
    plain = protege.distill(parse_recipe(r), tmp_path / "plain", export=False)
    r["student"]["init"] = "select"
    init = protege.distill(parse_recipe(r), tmp_path / "init", export=False)
    print("teacher", init.report.teacher.accuracy, "init", init.report.student.accuracy, "plain", plain.report.student.accuracy)
    assert init.report.teacher.accuracy > 0.9
    assert plain.report.student.accuracy < 0.3 < 0.6 < init.report.student.accuracy


def _cross_task_teacher(tmp_path) -> str:
    """A teacher trained on another label set: digits folded to 5 classes (label mod 5)."""
    from protege.data import load_data
    from protege.models import save_weights
    from protege.recipe import DataConfig

    d = load_data(DataConfig(source="digits"), 0)
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 5, (8, 16))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(d.train.x), d.train.y % 5).backward()
        opt.step()
    path = tmp_path / "five.safetensors"
    save_weights(model, path)
    return str(path)


def test_cross_task_teacher_teaches_through_features_only(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["teacher"] = {"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1, "num_classes": 5}, "weights": _cross_task_teacher(tmp_path)}
    with pytest.raises(ProtegeError, match=r"teacher scores 5 classes but the data has 10 classes: logit KD \(kl\) needs the same label set"):
        protege.distill(parse_recipe(r), tmp_path / "bad")
    assert not (tmp_path / "bad" / "recipe.yaml").exists()
    r["distill"].update(response="none", features=[{"loss": "hint", "student": "features.1", "teacher": "features.1"}])
    r["train"]["epochs"] = 6
    run = protege.distill(parse_recipe(r), tmp_path / "ok", export=False)
    last = [m for m in _metrics(run) if m["stage"] == "student"][-1]
    assert "kd" not in last and last["hint0"] > 0
    assert run.report.teacher.accuracy is None and "cross-task" in run.report.teacher.note
    assert "agreement" not in run.report.student.model_fields_set and run.report.student.accuracy > 0.5


def test_an_onnx_teacher_and_a_user_module_teacher_join_the_first(tmp_path, cnn_recipe):
    """Teachers of different formats: the recipe's (trained here), an ONNX file, and a user's Python module."""
    from protege.export.onnx import export_model_onnx
    from protege.models import build_model, load_weights
    from protege.recipe import ModelSpec

    first = protege.distill(parse_recipe(cnn_recipe), tmp_path / "a", export=False, evaluate_=False)
    t = build_model(ModelSpec(model="cnn", kwargs={"channels": [8, 16], "depth": 1}), (1, 8, 8), 10)
    load_weights(t, first.teacher_weights)
    export_model_onnx(t.eval(), torch.randn(2, 1, 8, 8), tmp_path / "t.onnx")
    (tmp_path / "mine.py").write_text("from protege.models.zoo import MLP\n\ndef build(in_shape, num_classes):\n"
                                      "    return MLP(in_shape, num_classes, hidden=[32])\n")
    from protege.models import save_weights
    from protege.models.zoo import MLP

    save_weights(MLP((1, 8, 8), 10, hidden=[32]), tmp_path / "mine.safetensors")
    r = copy.deepcopy(cnn_recipe)
    r["more_teachers"] = [{"model": str(tmp_path / "t.onnx"), "weight": 0.5},
                          {"model": f"{tmp_path / 'mine.py'}:build", "weights": str(tmp_path / "mine.safetensors")}]
    r["distill"]["features"] = [{"loss": "rkd_distance", "student": "logits", "teacher": "logits", "teacher_index": 1}]
    run = protege.distill(parse_recipe(r), tmp_path / "b", export=False, evaluate_=False)
    assert sorted(p.name for p in (run.path / "teacher_cache").iterdir()) == ["t0", "t1", "t2"]
    assert json.loads((run.path / "teacher_cache" / "t1" / "meta.json").read_text())["paths"] == []  # `logits` needs no hook
    assert [m for m in _metrics(run) if m["stage"] == "student"][-1]["rkd_distance0"] > 0


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY_SETS = ["data.limit=300", "train.epochs=1", "eval.repeats_b1=2", "eval.repeats_b32=1", "eval.warmup=1"]


def tiny_sets(path: Path) -> list[str]:
    import yaml

    trains_teacher = "train" in (yaml.safe_load(path.read_text()).get("teacher") or {})
    return TINY_SETS + (["teacher.train.epochs=1"] if trains_teacher else [])


def test_there_are_shipped_recipes():
    assert {"digits.yaml", "fashion_mnist.yaml", "fashion_mnist_29k.yaml", "digits_features.yaml",
            "digits_self_distill.yaml", "digits_born_again.yaml", "reviews_minilm.yaml", "kjv_smollm2.yaml"} <= {p.name for p in RECIPES}


def text_sets(path: Path, tmp: Path) -> list[str]:
    """A text recipe's model folders and files, replaced by tiny offline fixtures with the same columns and depth."""
    import yaml

    from ..text_fixtures import write_corpus, write_llama_folder

    d = yaml.safe_load(path.read_text())["data"]
    if d.get("source") == "lm_text":  # a Llama deep enough for the recipe's layer selection, a small corpus
        folder = write_llama_folder(tmp / "llama", layers=25, hidden=16)
        return [f"data.path={write_corpus(tmp / 'corpus.jsonl')}", f"teacher.model={folder}", f"student.model={folder}",
                "distill.topk=8"]  # the fixture's vocabulary has 27 tokens
    if d.get("source") != "text":
        return []
    folder = write_bert_folder(tmp / "bert", layers=6)
    cols = {"text_col": d.get("text", "text"), "label_col": d.get("target") or "label"}
    train, test = write_text_data(tmp / "train.csv", n=200, **cols), write_text_data(tmp / "test.csv", n=40, seed=1, **cols)
    return [f"data.path={train}", f"data.test_path={test}", "data.max_length=16", f"teacher.model={folder}",
            f"student.model={folder}"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_tiny(path, tmp_path):
    recipe = protege.load_recipe(path, tiny_sets(path) + text_sets(path, tmp_path))
    if recipe.data.source == "fashion_mnist" and not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    run = protege.distill(recipe, tmp_path / path.stem)
    if recipe.task == "causal_lm":
        assert run.report.student.test_ppl > 1 and run.report.student.params < run.report.teacher.params
        return
    assert run.report.student_onnx.accuracy == pytest.approx(run.report.student.accuracy)
    assert run.report.student.params <= run.report.teacher.params


@pytest.fixture(scope="module")
def distilbert_run(folders, tmp_path_factory):
    """Fine-tune the tiny teacher, distil a half-depth student initialised from its layers, export, dynamic int8."""
    r = parse_recipe(_recipe(folders, student={"model": str(folders["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 2},
                                               "init": "select"},
                             distill={"features": [{"loss": "hint", "student": "hidden.2", "teacher": "hidden.4"},
                                                   {"loss": "cosine", "student": "hidden.1", "teacher": "hidden.2"},
                                                   {"loss": "attention_kl", "student": "attention.1", "teacher": "attention.3"}]},
                             quantize={"mode": "auto"}))
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        mp.setenv("PROTEGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return protege.distill(r, tmp_path_factory.mktemp("runs") / "distilbert")


def test_distilbert_style_student_through_the_whole_pipeline(distilbert_run):
    rep = distilbert_run.report
    assert rep.teacher.accuracy >= 0.9  # the words decide the label: a fine-tuned teacher gets it
    assert rep.student.accuracy >= 0.9
    assert rep.student.params < rep.teacher.params
    assert rep.onnx_max_abs_diff <= 1e-4 and rep.student_onnx.accuracy == rep.student.accuracy
    q = rep.quantization
    assert {c["name"] for c in q.candidates} == {"fp32", "dynamic"}  # static int8 is not tried on token ids
    assert (distilbert_run.path / "quantized" / "dynamic.onnx").is_file()
    metrics = [json.loads(line) for line in (distilbert_run.path / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if m["stage"] == "student")
    assert {"hint0", "cosine1", "attention_kl2"} <= set(first)


def test_the_initialised_student_starts_well_above_chance(distilbert_run, folders):
    from protege.train.init import init_from_teacher_

    data = load_data(distilbert_run.recipe.data, 0)
    teachers, _ = distilbert_run.load_models(data)
    fresh = build_model(distilbert_run.recipe.student.model_copy(update={"init": None}), data.input_shape, 2, data.model_args)
    report = init_from_teacher_(fresh, teachers[0], "select")
    assert report.mapping[1][1].endswith("layer.2")  # every other layer, as DistilBERT
    acc = float((protege.knowledge.predict_logits(fresh, data.test.x).argmax(-1) == data.test.y).float().mean())
    assert acc >= 0.75  # chance is 0.5; no training yet


def test_static_int8_is_refused_for_token_ids(distilbert_run):
    from protege.recipe import QuantizeConfig

    with pytest.raises(ProtegeError, match="token ids.*dynamic"):
        protege.compress(distilbert_run.path, quantize=QuantizeConfig(mode="static"))
