"""The runtimes a recipe is verified on, one package each (torch_cpu, onnxruntime), behind one interface
(planner.runtimes.base.Runtime) and one registry (planner.runtimes.registry). How a runtime realizes a scheme
(ONNX Runtime's MatMulNBits for int4, torchao's tensor subclasses) stays inside its package."""
