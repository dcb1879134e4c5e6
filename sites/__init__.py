"""The hospital side of the federation: the Flower ClientApp."""
