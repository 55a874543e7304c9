"""The model and its files: what every user of a NextStep checkpoint loads.

- `checkpoint`: find and check a model folder's files, read its config, detect 1.0 / 1.1
  (`VersionSettings`), write released-layout folders;
- `model`: `NextStepModel` (transformers' Qwen2 decoder + projectors + flow head) and its
  streaming loader; `head`: the flow-matching MLP and its per-token fast path;
- `vae`: the image tokenizer on diffusers' `AutoencoderKL` (Flux key names converted on load);
- `prompt`: the text tokenizer and the guidance rows of a prompt;
- `precision` (bf16 / fp16 / fp32 / fp8 storage) and `stream` (safetensors read straight into
  place).

Imports nothing from the rest of the package but `errors`.
"""
