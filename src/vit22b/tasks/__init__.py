"""Transfer and evaluation tasks on a trained checkpoint, one module per `vit22b` sub-command:
`probe` (linear probe), `fewshot` (big_vision's closed-form ridge few-shot), `finetune`, `distill`,
`robustness` (distribution shifts + calibration), `lit` (locked-image text tower, zero-shot),
`segment` and `depth` (dense decoders on frozen patch tokens), `video` (temporal heads on frozen
per-frame features).

Each module exposes `add_parser(subparsers)` registering its sub-command with `func(args) -> int`."""
