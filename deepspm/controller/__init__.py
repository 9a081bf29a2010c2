"""The run loop and its decision policies: the only code that awaits the instrument and fires triggers."""
