"""Text front end: normalisation, BPE tokenisation, segmentation."""
