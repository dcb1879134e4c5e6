"""The aggregator side of the federation: the Flower ServerApp and the encrypted FedAvg strategy."""
