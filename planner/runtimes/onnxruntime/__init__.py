"""ONNX Runtime on the CPU: the runtime (runtime.OnnxRuntime), the ONNX build (export: export, quantize in
ONNX, predict file sizes; `python -m planner.runtimes.onnxruntime.export`) and the verification worker (worker,
`python -m planner.runtimes.onnxruntime.worker`, with no torch in the measured process)."""
