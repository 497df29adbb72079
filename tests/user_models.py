"""User model factories for tests (imported as ``tests.user_models:NAME``)."""

from torch import nn


def tiny(input_shape, num_classes):
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, num_classes))


def with_batchnorm(input_shape, num_classes):
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes)
    )


def not_a_module(input_shape, num_classes):
    return "nope"
