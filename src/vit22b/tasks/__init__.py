"""Transfer and evaluation tasks on a trained checkpoint, one module per `vit22b` sub-command
(e.g. `probe`: linear probe, `fewshot`: big_vision's closed-form ridge few-shot, `robustness`:
distribution shifts + calibration).

Each module exposes `add_parser(subparsers)` registering its sub-command with `func(args) -> int`."""
