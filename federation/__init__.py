"""more-fl: federated deep learning on MORE-encrypted data."""

__version__ = "0.1.0"
