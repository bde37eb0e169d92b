"""From a QAT model to an integer model: `convert` (convert.py) and the files a runtime reads — ONNX QDQ, encodings
JSON, torch.export programs (formats.py). Formats and tolerances: docs/export.md."""
