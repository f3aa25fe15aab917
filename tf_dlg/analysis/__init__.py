"""Analysis of attack outcomes: thresholds of defences and summaries."""
