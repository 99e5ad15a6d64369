"""Delta neuron steering for Mamba: the library behind the three step scripts."""

from .steering import (
    SteeringError,
    SteeringHandle,
    ablate,
    delta_statistics,
    num_delta_neurons,
    num_layers,
    steer,
    verify_steering_effect,
)

__all__ = [
    "SteeringError", "SteeringHandle", "ablate", "delta_statistics", "num_delta_neurons",
    "num_layers", "steer", "verify_steering_effect",
]
