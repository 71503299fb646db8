"""FlashLLA in Triton: blockwise Local Linear Attention with a conjugate-gradient solve."""
