"""deepspm: an autonomous controller for scanning tunnelling microscopes.

A tested re-implementation of DeepSPM (Krull et al., Commun. Phys. 3, 54, 2020) that speaks the Nanonis
TCP protocol directly. The package's top level is the five layers of design.md section 2.
"""

__version__ = "0.1.0"
