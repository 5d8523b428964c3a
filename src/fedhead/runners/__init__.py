"""Drivers that move data between the algorithm core and the world: in-process simulation, Flower."""
