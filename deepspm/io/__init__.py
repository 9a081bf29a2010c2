"""The Nanonis instrument layer: codec (sans-I/O) -> connection -> typed client -> safety -> Instrument."""
