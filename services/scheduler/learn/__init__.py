"""What produces the decision library's inputs: the RL environment and training, profiling on real
packs, the bridge between the numpy policy and torch."""
