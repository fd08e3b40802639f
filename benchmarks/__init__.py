"""Experiments and throughput measurements; imports seqenv and agents, imported by nothing."""
