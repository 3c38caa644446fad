"""The ground floor: device mesh and sharding, checkpoint I/O, the phase schedule."""
