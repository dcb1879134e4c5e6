"""The MORE scheme: keys, encryption, the encrypted tensor and its algebra, shadow health."""

from federation.more.cipher import (
    FeatureRange,
    RegressionRange,
    ShadowPolicy,
    ValidLabel,
    decrypt,
    decrypt_shadow,
    encrypt,
    leakage,
)
from federation.more.health import HealthReport, ShadowDivergenceError, check_tensors
from federation.more.keys import KeyFileError, MoreKey, generate_key, load_key, save_key
from federation.more.tensor import EncryptedTensor, KeyMismatchError, encode_plain

__all__ = [
    "EncryptedTensor",
    "FeatureRange",
    "HealthReport",
    "KeyFileError",
    "KeyMismatchError",
    "MoreKey",
    "RegressionRange",
    "ShadowDivergenceError",
    "ShadowPolicy",
    "ValidLabel",
    "check_tensors",
    "decrypt",
    "decrypt_shadow",
    "encode_plain",
    "encrypt",
    "generate_key",
    "leakage",
    "load_key",
    "save_key",
]
