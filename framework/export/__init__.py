"""Writers of the formats serving engines run: GGUF (llama.cpp, Ollama) and ONNX (onnxruntime).

Pure functions from a transformers model (and its tokenizer) to files; the export stage
(framework/stages/export.py) and the quantize stage's onnxruntime backend call them.
"""
