"""A user module for tests: an MLP that sleeps a little per training batch, so a run can be killed mid-way."""
import time

from torch import nn

from protege.models.zoo import MLP


class SlowMLP(MLP):
    def forward(self, x):
        if self.training:
            time.sleep(0.03)
        return super().forward(x)


def build(in_shape, num_classes, hidden=(32,), dropout=0.0):
    return SlowMLP(in_shape, num_classes, hidden, dropout)


def not_a_module(in_shape, num_classes):
    return "nope"
