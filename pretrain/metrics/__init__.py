"""Training metrics: the window of micro-batch sums (window), what one metrics line holds (line), FLOPs and
MFU (flops), loss curves and run comparisons (plots)."""
