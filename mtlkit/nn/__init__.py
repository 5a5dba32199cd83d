"""Neural building blocks that single papers need: losses (MTMLAN's sample-level balancing loss) and layers
(RRMTDL's gradient reversal). The multi-task architectures themselves are in :mod:`mtlkit.models`."""
