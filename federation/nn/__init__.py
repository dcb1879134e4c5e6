"""Encrypted layers, losses, SGD, torch <-> encrypted conversion and the trainer (no keys)."""

from federation.nn.convert import (
    SUPPORTED_LAYERS,
    UnsupportedLayerError,
    encode_state_dict,
    encrypted_parameters,
    load_encrypted_state,
    model_fingerprint,
    to_encrypted,
    to_plain,
)
from federation.nn.layers import Square
from federation.nn.train import (
    EncryptedSGD,
    TrainingDivergedError,
    batch_order,
    loss_gradient,
    predict_encrypted,
    train_encrypted,
    train_plain,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "EncryptedSGD",
    "Square",
    "TrainingDivergedError",
    "UnsupportedLayerError",
    "batch_order",
    "encode_state_dict",
    "encrypted_parameters",
    "load_encrypted_state",
    "loss_gradient",
    "model_fingerprint",
    "predict_encrypted",
    "to_encrypted",
    "to_plain",
    "train_encrypted",
    "train_plain",
]
