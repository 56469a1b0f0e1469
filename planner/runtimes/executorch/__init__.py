"""ExecuTorch with the XNNPACK delegate: the edge runtime (runtime.py), its lowering (lower.py), its worker."""
