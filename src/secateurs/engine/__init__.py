"""The calibration engine: run a model one block at a time, collect statistics, let a method act."""
