"""PyTorch eager on the CPU with torchao's quantized tensors: the runtime (runtime.TorchCpu) and its
verification worker (worker, `python -m planner.runtimes.torch_cpu.worker`)."""
