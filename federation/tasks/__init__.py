"""The healthcare tasks (MNIST, WBC hemodynamics, angiography views): plain torch/numpy."""
