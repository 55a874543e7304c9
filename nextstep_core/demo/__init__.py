"""The demo model's world: procedural scenes, their checker, training and evaluation.

- `scenes`: coloured shapes on plain backgrounds, exact captions, edit triples;
- `checker`: finds each object in an image and scores it against a caption;
- `objective`, `train`, `data`, `stage`: the paper's training objective and a CPU-sized training run;
- `evaluate`: prompt-following scores of a model on held-out captions and edits;
- `tiny`, `tiny_tokenizer`: small random checkpoints in the released layouts (tests, benchmarks).

Uses the public pipeline and `engine`; nothing in the engine uses it.
"""
