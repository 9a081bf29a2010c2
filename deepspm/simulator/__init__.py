"""A simulated STM behind a fake Nanonis TCP server, and the in-process RL environment."""
