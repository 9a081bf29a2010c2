"""The run's explicit state machine: states, transition table (data), guards, machine factory.

Pure: imports none of deepspm's other layers.
"""
