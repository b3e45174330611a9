"""Training: the fit / evaluate / predict loop (`loop`), the compiled steps (`step`, built by `build`), what one fit
tracks (`run`, `logs`, `stacking`, `resume`), checkpoints, callbacks, metrics and tasks."""
