"""Fitting a GPU: block swap (`offload`), the memory planner (`plan`) and its yardstick (`probe`).

Uses `engine` (model files, precision, the image tokenizer's config); `pipeline` and the
ComfyUI loader use it.
"""
