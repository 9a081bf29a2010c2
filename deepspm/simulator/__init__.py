"""A simulated STM behind a fake Nanonis TCP server, and the in-process RL environment."""

from deepspm.simulator.fake_nanonis import SimulatorServer, microscope_handlers, serve_forever

__all__ = ["SimulatorServer", "microscope_handlers", "serve_forever"]
