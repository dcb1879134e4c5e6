"""Encrypted layers, losses, optimisers, torch <-> encrypted conversion, the trainer (no keys)."""

from federation.nn.convert import (
    UnsupportedLayerError,
    encode_state_dict,
    encrypted_buffers,
    encrypted_parameters,
    load_encrypted_state,
    model_fingerprint,
    to_encrypted,
    to_plain,
    validate,
)
from federation.nn.graph import EncryptedGraphModule
from federation.nn.layers import SUPPORTED_LAYERS, Square
from federation.nn.losses import (
    L1,
    LOSSES,
    MSE,
    BCEWithLogits,
    CrossEntropy,
    EncryptedLoss,
    Huber,
    SmoothL1,
    get_loss,
    loss_from_torch,
    loss_gradient,
    plain_loss,
)
from federation.nn.optim import EncryptedAdam, EncryptedAdamW, EncryptedOptimizer, EncryptedSGD
from federation.nn.train import (
    TrainingDivergedError,
    batch_order,
    predict_encrypted,
    train_encrypted,
    train_plain,
)

__all__ = [
    "L1",
    "LOSSES",
    "MSE",
    "SUPPORTED_LAYERS",
    "BCEWithLogits",
    "CrossEntropy",
    "EncryptedAdam",
    "EncryptedAdamW",
    "EncryptedGraphModule",
    "EncryptedLoss",
    "EncryptedOptimizer",
    "EncryptedSGD",
    "Huber",
    "SmoothL1",
    "Square",
    "TrainingDivergedError",
    "UnsupportedLayerError",
    "batch_order",
    "encode_state_dict",
    "encrypted_buffers",
    "encrypted_parameters",
    "get_loss",
    "load_encrypted_state",
    "loss_from_torch",
    "loss_gradient",
    "model_fingerprint",
    "plain_loss",
    "predict_encrypted",
    "to_encrypted",
    "to_plain",
    "train_encrypted",
    "train_plain",
    "validate",
]
