"""Process groups, TP sharding, group-checked collectives, parity handshake. Imports model."""
