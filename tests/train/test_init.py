"""init_from_teacher_: depth selection / averaging and importance-based width slicing of zoo models."""
import pytest
import torch
from torch import nn

from protege.data import load_data
from protege.errors import ModelError, ProtegeError
from protege.models.zoo import CNN, MLP, ResNet
from protege.recipe import DataConfig
from protege.train.init import InitReport, init_from_teacher_


SHAPE, CLASSES = (1, 8, 8), 10
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm distinct, non-default tensors so copies can be told apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for key in BN_KEYS:
                    getattr(m, key).copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _bn_equal(s: nn.BatchNorm2d, t: nn.BatchNorm2d, idx) -> bool:
    return all(torch.equal(getattr(s, k), getattr(t, k)[idx]) for k in BN_KEYS)


def test_select_same_width_half_depth_copies_the_selected_layers_exactly():
    torch.manual_seed(0)
    teacher, student = _randomise_bn(CNN(SHAPE, CLASSES, (4, 6), depth=4)), CNN(SHAPE, CLASSES, (4, 6), depth=2)
    report = init_from_teacher_(student, teacher, "select")
    assert isinstance(report, InitReport) and report.method == "select" and report.layers_copied == 5
    full = torch.arange(6)
    for stage in range(2):
        for j, tj in ((0, 0), (1, 2)):  # student conv j <- teacher conv 2j (every 2nd, first kept)
            s_conv, t_conv = student.features[stage][3 * j], teacher.features[stage][3 * tj]
            assert torch.equal(s_conv.weight, t_conv.weight)
            assert _bn_equal(student.features[stage][3 * j + 1], teacher.features[stage][3 * tj + 1], full[:t_conv.out_channels])
            assert (f"features.{stage}.{3 * j}", f"features.{stage}.{3 * tj}") in report.mapping
    assert torch.equal(student.head.weight, teacher.head.weight) and torch.equal(student.head.bias, teacher.head.bias)


def test_narrower_cnn_keeps_the_top_gamma_channels_and_carries_them_into_the_next_layer():
    torch.manual_seed(0)
    teacher, student = _randomise_bn(CNN(SHAPE, CLASSES, (6, 8), depth=1)), CNN(SHAPE, CLASSES, (3, 4), depth=1)
    t0, t1 = teacher.features[0][1], teacher.features[1][1]
    with torch.no_grad():  # importance = |gamma|: hand-set so the kept channels are known (sign ignored)
        t0.weight.copy_(torch.tensor([0.1, -3.0, 0.2, 2.0, 0.3, 1.0]))  # top 3: 1, 3, 5
        t1.weight.copy_(torch.tensor([5.0, 0.1, 4.0, 0.1, 0.1, -3.0, 0.1, 2.0]))  # top 4: 0, 2, 5, 7
    init_from_teacher_(student, teacher)
    k0, k1 = torch.tensor([1, 3, 5]), torch.tensor([0, 2, 5, 7])
    assert torch.equal(student.features[0][0].weight, teacher.features[0][0].weight[k0])  # (3, 1, 3, 3)
    assert _bn_equal(student.features[0][1], t0, k0)
    assert torch.equal(student.features[1][0].weight, teacher.features[1][0].weight[k1][:, k0])  # (4, 3, 3, 3)
    assert _bn_equal(student.features[1][1], t1, k1)
    assert torch.equal(student.head.weight, teacher.head.weight[:, k1]) and torch.equal(student.head.bias, teacher.head.bias)


def test_resnet_keeps_one_channel_selection_for_the_whole_residual_stream():
    torch.manual_seed(0)
    teacher, student = _randomise_bn(ResNet(SHAPE, CLASSES, 8, width=4)), ResNet(SHAPE, CLASSES, 8, width=2)
    with torch.no_grad():  # stage 1's stream = stem + layer1.0.bn2; alone each would keep {0, 2} / {2, 3}
        teacher.stem[1].weight.copy_(torch.tensor([3.0, 0.1, 0.2, 0.1]))
        teacher.layer1[0].bn2.weight.copy_(torch.tensor([0.1, 0.1, 0.2, 3.0]))
    init_from_teacher_(student, teacher)
    keep = torch.tensor([0, 3])  # summed |gamma|: 3.1, 0.2, 0.4, 3.1
    assert torch.equal(student.stem[0].weight, teacher.stem[0].weight[keep])
    assert _bn_equal(student.layer1[0].bn2, teacher.layer1[0].bn2, keep)
    inner = teacher.layer1[0].bn1.weight.abs().topk(2).indices.sort().values
    assert torch.equal(student.layer1[0].conv1.weight, teacher.layer1[0].conv1.weight[inner][:, keep])
    assert torch.equal(student.layer1[0].conv2.weight, teacher.layer1[0].conv2.weight[keep][:, inner])

    def top(*bns):
        return sum(bn.weight.abs() for bn in bns).topk(4).indices.sort().values

    res2, inner2 = top(teacher.layer2[0].bn2, teacher.layer2[0].shortcut[1]), top(teacher.layer2[0].bn1)
    assert torch.equal(student.layer2[0].shortcut[0].weight, teacher.layer2[0].shortcut[0].weight[res2][:, keep])
    assert torch.equal(student.layer2[0].conv1.weight, teacher.layer2[0].conv1.weight[inner2][:, keep])
    assert _bn_equal(student.layer2[0].shortcut[1], teacher.layer2[0].shortcut[1], res2)


def test_narrower_mlp_keeps_the_neurons_with_the_largest_weight_rows():
    torch.manual_seed(0)
    teacher, student = MLP(SHAPE, CLASSES, hidden=(6,)), MLP(SHAPE, CLASSES, hidden=(2,))
    with torch.no_grad():  # no BatchNorm: importance = L2 norm of each neuron's weight row
        teacher.body[1].weight.mul_(torch.tensor([1.0, 9.0, 1.0, 1.0, 8.0, 1.0])[:, None])
    init_from_teacher_(student, teacher)
    keep = torch.tensor([1, 4])
    assert torch.equal(student.body[1].weight, teacher.body[1].weight[keep])
    assert torch.equal(student.body[1].bias, teacher.body[1].bias[keep])
    assert torch.equal(student.head.weight, teacher.head.weight[:, keep])


def test_average_is_the_mean_of_the_replaced_teacher_layers():
    torch.manual_seed(0)
    teacher, student = _randomise_bn(CNN(SHAPE, CLASSES, (4, 4), depth=2)), CNN(SHAPE, CLASSES, (4, 4), depth=1)
    report = init_from_teacher_(student, teacher, "average")
    a, b = teacher.features[1][0], teacher.features[1][3]  # both 4 -> 4 channels
    assert torch.allclose(student.features[1][0].weight, (a.weight + b.weight) / 2, rtol=0, atol=1e-7)
    for key in BN_KEYS:
        mean = (getattr(teacher.features[1][1], key) + getattr(teacher.features[1][4], key)) / 2
        assert torch.allclose(getattr(student.features[1][1], key), mean, rtol=0, atol=1e-7)
    # Stage 1's first conv takes 1 input channel, its second 4: shapes differ, so it is copied alone.
    assert torch.equal(student.features[0][0].weight, teacher.features[0][0].weight)
    assert report.mapping == [("features.0.0", "features.0.0"), ("features.1.0", "features.1.0+features.1.3"), ("head", "head")]


def test_every_sets_the_stride_of_the_selection():
    torch.manual_seed(0)
    teacher, student = CNN(SHAPE, CLASSES, (4, 6), depth=4), CNN(SHAPE, CLASSES, (4, 6), depth=2)
    report = init_from_teacher_(student, teacher, "select", every=3)
    assert report.mapping[:2] == [("features.0.0", "features.0.0"), ("features.0.3", "features.0.9")]
    assert torch.equal(student.features[1][3].weight, teacher.features[1][9].weight)
    with pytest.raises(ModelError, match="every=4 needs 5 conv layers in teacher stage 1 but it has 4; lower every"):
        init_from_teacher_(student, teacher, "select", every=4)


def test_teacher_is_unchanged():
    torch.manual_seed(0)
    teacher = _randomise_bn(ResNet(SHAPE, CLASSES, 14, width=8))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for method in ("select", "average"):
        student = ResNet(SHAPE, CLASSES, 8, width=4)
        init_from_teacher_(student, teacher, method)
        student.head.weight.data.add_(1.0)  # a copy, not a view of the teacher's tensor
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("student, teacher, message", [
    (CNN(SHAPE, CLASSES, (16, 64)), CNN(SHAPE, CLASSES, (16, 32)),
     "student stage 2 conv 1 \\(features.1.0\\) has 64 channels but the teacher only 32; a student can only be narrower"),
    (ResNet(SHAPE, CLASSES, 8, width=32), ResNet(SHAPE, CLASSES, 8, width=16), "student stage 1 has 32 channels but the teacher only 16"),
    (MLP(SHAPE, CLASSES, (32,)), CNN(SHAPE, CLASSES, (16, 32)), "the student is a mlp but the teacher a cnn; both must be the same zoo family"),
    (CNN(SHAPE, CLASSES, (16, 32)), CNN(SHAPE, CLASSES, (16, 32, 64)), "student has 2 stages but the teacher 3"),
    (CNN(SHAPE, CLASSES, (16, 32), depth=3), CNN(SHAPE, CLASSES, (16, 32), depth=2), "student stage 1 has 3 conv layers but the teacher only 2"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), MLP(SHAPE, CLASSES), "the student is a Sequential, not a protege zoo model"),
    (MLP(SHAPE, 5, (32,)), MLP(SHAPE, CLASSES, (64,)), "student predicts 5 classes but the teacher 10; build the student with num_classes=10"),
])
def test_unsupported_pairs_raise_a_one_line_error(student, teacher, message):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ModelError, match=f"^init_from_teacher: {message}") as err:
        init_from_teacher_(student, teacher)
    assert isinstance(err.value, ProtegeError) and "\n" not in str(err.value)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # untouched on error


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(source="digits"), 0)


def _train(model: nn.Module, data, epochs: int) -> nn.Module:
    """A plain Adam loop: enough for > 95% test accuracy on digits in a few seconds."""
    torch.manual_seed(0)
    opt, gen = torch.optim.Adam(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.train), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def _accuracy(model: nn.Module, split) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(split.x).argmax(-1) == split.y).float().mean())


# Test accuracy on digits (10 classes) before any student training, observed here (torch, CPU), as
# asserted below [and over 4 other teacher seeds]; the random-init students scored 0.05-0.10:
#   cnn (16,32) depth 2 (0.99) -> (14,28) depth 2, width slicing:    0.43  [0.58-0.69]
#   resnet8 width 16 (0.98)    -> resnet8 width 12, width slicing:   0.79  [0.34-0.71]
#   resnet14 width 16 (0.98)   -> resnet8 width 16, block selection: 0.83  [0.70-0.87]
#   mlp (256,128) (0.98)       -> mlp (64,64), width slicing:        0.55  [0.67-0.86]
# Not asserted, because they stay near chance: dropping convs of a plain (non-residual) CNN, as in
# cnn (16,32) depth 2 -> (16,32) depth 1 [0.03-0.15] or (8,16) depth 1 [0.06-0.10] (the next conv then
# reads features it was not trained on), mlp (256,128) -> (64,) [0.04-0.23] (same, for the head), and
# halving every width at once: resnet8 width 16 -> 8 [0.10-0.27].
@pytest.mark.parametrize("teacher, epochs, student", [
    (lambda: CNN(SHAPE, CLASSES, (16, 32), depth=2), 8, lambda: CNN(SHAPE, CLASSES, (14, 28), depth=2)),
    (lambda: ResNet(SHAPE, CLASSES, 8, width=16), 8, lambda: ResNet(SHAPE, CLASSES, 8, width=12)),
    (lambda: ResNet(SHAPE, CLASSES, 14, width=16), 8, lambda: ResNet(SHAPE, CLASSES, 8, width=16)),
    (lambda: MLP(SHAPE, CLASSES, (256, 128)), 8, lambda: MLP(SHAPE, CLASSES, (64, 64))),
], ids=["cnn-width", "resnet-width", "resnet-depth", "mlp-width"])
def test_initialised_student_beats_chance_before_training(digits, teacher, epochs, student):
    teacher = _train(teacher(), digits, epochs)
    assert _accuracy(teacher, digits.test) > 0.9
    torch.manual_seed(1)
    random_student, stolen = student(), student()
    stolen.load_state_dict(random_student.state_dict())
    init_from_teacher_(stolen, teacher)
    random_acc, stolen_acc = _accuracy(random_student, digits.test), _accuracy(stolen, digits.test)
    print(f"teacher {_accuracy(teacher, digits.test):.3f}  initialised {stolen_acc:.3f}  random {random_acc:.3f}")
    assert random_acc < 0.2
    assert stolen_acc > 0.3


# Observed: cnn (16,32) d2 -> (14,28) d2: 0.80 -> 0.99; resnet8 w16 -> w8: 0.20 -> 0.47. A plain CNN cut in depth
# ((16,32) d2 -> (8,16) d1) stays at chance (0.10 -> 0.10): no statistics can fix a conv reading untrained features.
@pytest.mark.parametrize("student", [lambda: CNN(SHAPE, CLASSES, (14, 28), depth=2), lambda: ResNet(SHAPE, CLASSES, 8, width=8)],
                         ids=["cnn-width", "resnet-half-width"])
def test_batchnorm_recalibration_repairs_a_sliced_student(digits, student):
    from protege.train.init import recalibrate_bn_

    teacher = _train(CNN(SHAPE, CLASSES, (16, 32), depth=2) if "CNN" in repr(student()) else ResNet(SHAPE, CLASSES, 8, width=16), digits, 8)
    torch.manual_seed(1)
    stolen = student()
    init_from_teacher_(stolen, teacher)
    before = _accuracy(stolen, digits.test)
    assert recalibrate_bn_(stolen, digits.train.x) == sum(isinstance(m, nn.BatchNorm2d) for m in stolen.modules())
    after = _accuracy(stolen, digits.test)
    print(f"initialised {before:.3f} -> after BN recalibration {after:.3f}")
    assert after > before + 0.15 and after > 0.4
